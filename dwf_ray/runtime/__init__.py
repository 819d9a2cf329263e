"""Starting, joining and leaving Ray, and what the cluster offers a task.

The package's modules by concern: ``env`` (settings applied at import, before Ray is), ``logs`` (quiet runs:
log records and the native standard error to a file), ``progress`` (progress bars over Ray refs and the counter
actor), ``data`` (Ray Data helpers).
"""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import threading
import time

import dwf_ray.runtime.env  # noqa: F401  (its settings before Ray is imported)

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


def cluster_gpus() -> int:
    """GPUs in the Ray cluster this process is connected to (0 when Ray is not running)."""
    return int(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0


def task_device() -> str:
    """"cuda" inside a Ray task or actor that was given a GPU, else "cpu"."""
    import torch
    return "cuda" if ray.is_initialized() and ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"


def cluster_cpus() -> int:
    """CPUs in the Ray cluster this process is connected to (1 when Ray is not running)."""
    return max(1, int(ray.cluster_resources().get("CPU", 1))) if ray.is_initialized() else 1
