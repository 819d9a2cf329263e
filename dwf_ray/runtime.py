"""Starting or joining Ray, and small helpers shared by the stages."""
from __future__ import annotations

import os

# Settings this project needs before Ray is imported (see README): no auth token, no usage stats,
# single-node Ray bound to loopback.
for _k, _v in {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
               "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "HF_HUB_OFFLINE": "1"}.items():
    os.environ.setdefault(_k, _v)

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import ray  # noqa: E402

_FORWARDED_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
                  "AWS_REGION", "AWS_ENDPOINT_URL", "HF_HUB_OFFLINE")


def ensure_ray(num_cpus: int | None = None) -> None:
    """Join the running Ray, the cluster at RAY_ADDRESS, or start a local one.

    S3 settings (AWS_*) are forwarded to every worker so that they reach the same store.
    """
    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
    runtime_env = {"env_vars": env} if env else None
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], runtime_env=runtime_env, log_to_driver=True)
    else:
        # "local": always a fresh local Ray, never a stale `ray start` left on this machine
        ray.init(address="local", num_cpus=num_cpus, runtime_env=runtime_env, include_dashboard=False)


def cluster_gpus() -> int:
    """GPUs in the Ray cluster this process is connected to (0 when Ray is not running)."""
    return int(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0


def wait_with_progress(refs: list, desc: str) -> list:
    """ray.get with a tqdm bar that advances as tasks finish; results keep the order of ``refs``."""
    from tqdm.auto import tqdm
    index = {r: i for i, r in enumerate(refs)}
    out = [None] * len(refs)
    pending = list(refs)
    with tqdm(total=len(refs), desc=desc, unit="model") as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for r in done:
                out[index[r]] = ray.get(r)
                bar.update(1)
    return out


def chunks(df: pd.DataFrame, size: int) -> list[pd.DataFrame]:
    """Consecutive row blocks of ``size``: one Ray Data block (and task) each, so every worker gets a share."""
    return [df.iloc[i:i + size] for i in range(0, len(df), size)]


def task_device() -> str:
    """"cuda" inside a Ray task or actor that was given a GPU, else "cpu"."""
    import torch
    return "cuda" if ray.is_initialized() and ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"


def map_chunks(fn, sets: dict[str, tuple[tuple, tuple]], desc: str, chunk: int = 64, num_gpus: float = 0.0,
               **kwargs) -> dict[str, tuple]:
    """Ray tasks ``fn(*shared, *rows, **kwargs)`` over chunks of several named sets; outputs concatenated per set.

    ``sets[name] = (shared arguments, arrays with one row per model)``; only the latter are chunked.
    ``num_gpus``: GPUs given to each task.
    """
    remote = ray.remote(fn).options(num_gpus=num_gpus)
    jobs, refs = [], []
    for name, (shared, rows) in sets.items():
        for i in range(0, len(rows[0]), chunk):
            jobs.append(name)
            refs.append(remote.remote(*shared, *(r[i:i + chunk] for r in rows), **kwargs))
    results = wait_with_progress(refs, desc)
    out: dict[str, list] = {name: [] for name in sets}
    for name, res in zip(jobs, results):
        out[name].append(res)
    return {name: tuple(np.concatenate(col) for col in zip(*parts)) for name, parts in out.items()}
