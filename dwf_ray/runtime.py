"""Starting or joining Ray, and small helpers shared by the stages."""
from __future__ import annotations

import importlib
import json
import logging
import os
import sys
from contextlib import contextmanager

# Settings this project needs before Ray is imported (see README): no auth token, no usage stats,
# single-node Ray bound to loopback.
for _k, _v in {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
               "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "HF_HUB_OFFLINE": "1"}.items():
    os.environ.setdefault(_k, _v)

import pandas as pd  # noqa: E402
import ray  # noqa: E402

_FORWARDED_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
                  "AWS_REGION", "AWS_ENDPOINT_URL", "HF_HUB_OFFLINE")


def ensure_ray(num_cpus: int | None = None, quiet: bool = False) -> None:
    """Join the running Ray, the cluster at RAY_ADDRESS, or start a local one.

    S3 settings (AWS_*) are forwarded to every worker so that they reach the same store. ``quiet``: workers'
    output stays in Ray's session logs instead of the terminal (``quiet_logs`` takes the driver's).
    """
    if ray.is_initialized():
        return
    # Under `ray job submit` the job's runtime env already gives its env_vars to every worker, and ray.init
    # refuses to set the same keys again ("Failed to merge the Job's runtime env").
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    given = (job.get("runtime_env") or {}).get("env_vars") or {}
    env = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ and k not in given}
    runtime_env = {"env_vars": env} if env else None
    if quiet:
        from ray.data import DataContext
        DataContext.get_current().enable_progress_bars = False    # each stage shows its own bar
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], runtime_env=runtime_env, log_to_driver=not quiet)
    else:
        # "local": always a fresh local Ray, never a stale `ray start` left on this machine
        ray.init(address="local", num_cpus=num_cpus, runtime_env=runtime_env, include_dashboard=False,
                 log_to_driver=not quiet)


_NOISY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve", "py.warnings", "filelock", "fsspec")


@contextmanager
def quiet_logs(path: str):
    """Log records of Ray and the libraries, Python warnings, and what Ray's C++ core writes to the process's
    standard error go to the file ``path`` (appended) instead of the terminal while the block runs; progress
    bars and the pipeline's own lines stay on screen."""
    importlib.import_module("ray.data")   # it sets its loggers' handlers on first import: do that before replacing
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    saved = [(lg, lg.handlers[:], lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.handlers, lg.propagate = [handler], False
    logging.captureWarnings(True)
    try:
        with _native_stderr_to(path):
            yield
    finally:
        logging.captureWarnings(False)
        for lg, handlers, propagate in saved:
            lg.handlers, lg.propagate = handlers, propagate
        handler.close()


@contextmanager
def _native_stderr_to(path: str):
    """File descriptor 2 (where Ray's C++ core logs, e.g. its actor-restart warnings) goes to ``path``, while
    Python's ``sys.stderr`` keeps writing to the terminal. Does nothing when ``sys.stderr`` is not descriptor 2
    (under a test runner's capture, for example)."""
    try:
        on_fd2 = sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):
        on_fd2 = False
    if not on_fd2:
        yield
        return
    sys.stderr.flush()
    terminal = os.dup(2)
    log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    saved = sys.stderr
    sys.stderr = open(terminal, "w", buffering=1, encoding=saved.encoding, errors="backslashreplace",
                      closefd=False)
    try:
        yield
    finally:
        sys.stderr.flush()
        sys.stderr.close()
        sys.stderr = saved
        os.dup2(terminal, 2)
        os.close(terminal)


@ray.remote(num_cpus=0)
class Counter:
    """A number that workers advance and the driver reads: progress of work that runs elsewhere."""

    def __init__(self):
        self.value = 0

    def set(self, value: int) -> None:
        self.value = value

    def get(self) -> int:
        return self.value


def run_with_progress(fn, total: int, desc: str, unit: str = "step", poll_s: float = 0.5):
    """``fn(counter)`` in a thread, with a tqdm bar that follows the ``Counter`` its workers set; returns (or
    raises) what ``fn`` does."""
    import threading
    from tqdm.auto import tqdm
    counter = Counter.remote()
    out: dict = {}

    def target():
        try:
            out["value"] = fn(counter)
        except BaseException as exc:  # re-raised in the caller's thread
            out["error"] = exc
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    with tqdm(total=total, desc=desc, unit=unit) as bar:
        while thread.is_alive():
            thread.join(poll_s)
            bar.update(max(0, min(total, ray.get(counter.get.remote())) - bar.n))
    ray.kill(counter)
    if "error" in out:
        raise out["error"]
    return out["value"]


def cluster_gpus() -> int:
    """GPUs in the Ray cluster this process is connected to (0 when Ray is not running)."""
    return int(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0


def wait_with_progress(refs: list, desc: str, bar=None, sizes: list[int] | None = None, on_died=None) -> list:
    """ray.get with a tqdm bar that advances as tasks finish (by ``sizes[i]`` for task i, default 1);
    ``bar`` continues an existing bar instead of opening one. Results keep the order of ``refs``.
    ``on_died(i, exc)``: the result of task i when its worker process died more often than its retries allow
    (otherwise that error is raised)."""
    from tqdm.auto import tqdm
    index = {r: i for i, r in enumerate(refs)}
    out = [None] * len(refs)
    pending = list(refs)
    own = bar is None
    bar = tqdm(total=sum(sizes) if sizes else len(refs), desc=desc, unit="model") if own else bar
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for r in done:
                try:
                    out[index[r]] = ray.get(r)
                except (ray.exceptions.WorkerCrashedError, ray.exceptions.OutOfMemoryError) as exc:
                    if on_died is None:
                        raise
                    out[index[r]] = on_died(index[r], exc)
                bar.update(sizes[index[r]] if sizes else 1)
    finally:
        if own:
            bar.close()
    return out


def rows_with_progress(ds, total: int, desc: str) -> pd.DataFrame:
    """A Ray Dataset's rows as one DataFrame, with a tqdm bar that advances as its batches arrive."""
    from tqdm.auto import tqdm
    parts = []
    with tqdm(total=total, desc=desc, unit="model") as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="pandas"):
            parts.append(batch)
            bar.update(len(batch))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def row_blocks(df: pd.DataFrame, size: int):
    """A Ray Dataset of ``df``'s rows in blocks of about ``size`` rows: one task each, so every worker gets a
    share. Built in the driver: ``from_pandas`` would run a remote task per block just to read its schema."""
    return ray.data.from_items(df.to_dict("records"), override_num_blocks=max(1, -(-len(df) // size)))


def task_device() -> str:
    """"cuda" inside a Ray task or actor that was given a GPU, else "cpu"."""
    import torch
    return "cuda" if ray.is_initialized() and ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"


def cluster_cpus() -> int:
    """CPUs in the Ray cluster this process is connected to (1 when Ray is not running)."""
    return max(1, int(ray.cluster_resources().get("CPU", 1))) if ray.is_initialized() else 1
