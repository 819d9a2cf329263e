"""Starting or joining Ray, and small helpers shared by the stages."""
from __future__ import annotations

import importlib
import json
import logging
import os
import re
import signal
import sys
import threading
import time
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


# Set when ensure_ray starts a local Ray in this process: when ("since", in clock ticks since boot, as /proc
# counts) and its session folder ("session_dir").
_LOCAL_RAY: dict = {}


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
    on_sigterm = signal.getsignal(signal.SIGTERM)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], runtime_env=runtime_env, log_to_driver=not quiet)
    else:
        _LOCAL_RAY["since"] = _uptime_ticks()    # every process of the session starts after this
        # "local": always a fresh local Ray, never a stale `ray start` left on this machine
        ray.init(address="local", num_cpus=num_cpus, runtime_env=runtime_env, include_dashboard=False,
                 log_to_driver=not quiet)
        _LOCAL_RAY["session_dir"] = ray._private.worker._global_node.get_session_dir_path()
    if callable(on_sigterm) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_sigterm)   # ray.init put sys.exit(15) there; keep the caller's handler


def shutdown() -> None:
    """Leave Ray. When ``ensure_ray`` started a local Ray here, stop it, and then every process of its session
    that outlived Ray's own shutdown (e.g. a worker whose raylet was killed before it stopped it): the members of
    this process's group (ray.init makes the driver a group leader) and the pids that the session's log files
    record, each started after the session began. Never a process found by name, never another session's."""
    node = ray._private.worker._global_node       # set even when a signal stopped ray.init half-way
    session_dir = _LOCAL_RAY.pop("session_dir", None) or (node.get_session_dir_path() if node else None)
    try:
        ray.shutdown()
    except Exception as exc:    # a half-started or broken session: its processes are still swept below
        logging.getLogger(__name__).warning("ray.shutdown failed: %s", exc)
    since = _LOCAL_RAY.pop("since", None)
    if since is None:
        return
    deadline, refused = time.monotonic() + 10, set()
    while (leftovers := _session_leftovers(session_dir, since) - refused) and time.monotonic() < deadline:
        for pid in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            except PermissionError:       # not ours after all (a pid reused by another user's process)
                refused.add(pid)
        time.sleep(0.1)


def _uptime_ticks() -> int:
    """Now, in clock ticks since boot (the unit of a process's start time in /proc/PID/stat); 0 without /proc."""
    try:
        with open("/proc/uptime") as f:
            return int(float(f.read().split()[0]) * os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError):
        return 0


def _process_table() -> dict[int, tuple[int, int]]:
    """Live processes (Linux /proc; empty elsewhere): pid -> (process group, start time in clock ticks)."""
    table = {}
    for name in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()    # after "pid (comm)": state ppid pgrp ...
        except (OSError, IndexError):
            continue                                             # it just ended
        if fields[0] not in "ZX":                                # a zombie has ended already
            table[int(name)] = (int(fields[2]), int(fields[19]))
    return table


def _session_leftovers(session_dir: str | None, since: int) -> set[int]:
    """Live processes of this process's local Ray session (see ``shutdown``); never this process."""
    recorded = set()      # worker-<id>-<job>-<pid>.out, python-core-worker-<id>_<pid>.log, ...
    logs = os.path.join(session_dir, "logs") if session_dir else None
    for name in os.listdir(logs) if logs and os.path.isdir(logs) else ():
        if m := re.search(r"[-_](\d+)\.(?:out|err|log)$", name):
            recorded.add(int(m.group(1)))
    me = os.getpid()
    group = me if os.getpgrp() == me else None
    return {pid for pid, (pgrp, start) in _process_table().items()
            if pid != me and start >= since and (pgrp == group or pid in recorded)}


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
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    counter = Counter.options(scheduling_strategy=here).remote()   # on the driver's node: lives as long as it
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
