"""What a stage costs besides time: the driver's peak resident memory and the object store's peak use."""
from __future__ import annotations

import threading
from functools import lru_cache


def _reset_peak_rss() -> bool:
    """Start a new peak (Linux: writing 5 to clear_refs resets VmHWM); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None


@lru_cache(maxsize=4)
def _cluster_state(gcs_address: str):
    """One connection to the cluster's state per Ray cluster, reused by every sample."""
    from ray._private.internal_api import get_state_from_address
    return get_state_from_address(gcs_address)


def object_store_bytes() -> int | None:
    """Bytes in use in the Ray object store, cluster-wide (None when Ray cannot say)."""
    try:
        import ray
        from ray._private.internal_api import get_memory_info_reply
        reply = get_memory_info_reply(_cluster_state(ray.get_runtime_context().gcs_address), timeout_seconds=5)
        return int(reply.store_stats.object_store_bytes_used)
    except Exception:   # a private API of Ray's: a missing number, never a failed stage
        return None


class StageMeter:
    """While a stage runs: the driver's peak RSS (from the stage's start) and the object store's peak use,
    sampled every ``interval`` seconds in a thread. ``result()`` gives both in bytes (None where unmeasured)."""

    def __init__(self, interval: float = 1.0):
        self.interval, self.store_peak = interval, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._rss_reset = False

    def _sample(self) -> None:
        while True:
            used = object_store_bytes()
            if used is not None:
                self.store_peak = max(self.store_peak or 0, used)
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> "StageMeter":
        self._rss_reset = _reset_peak_rss()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def result(self) -> dict:
        return {"driver_peak_rss_bytes": peak_rss_bytes() if self._rss_reset else None,
                "object_store_peak_bytes": self.store_peak}
