"""Progress bars over work that runs elsewhere: Ray refs as they finish, and a counter actor that workers set."""
from __future__ import annotations

import ray

@ray.remote(num_cpus=0)
class Counter:
    """A number that workers advance and the driver reads: progress of work that runs elsewhere."""

    def __init__(self):
        self.value = 0

    def set(self, value: int) -> None:
        self.value = value

    def get(self) -> int:
        return self.value


def on_driver_node():
    """The scheduling strategy that keeps a bookkeeping actor on this driver's node: a worker node that dies
    cannot take it along (a progress counter, the canon job's attempt ledger)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)


def run_with_progress(fn, total: int, desc: str, unit: str = "step", poll_s: float = 0.5):
    """``fn(counter)`` in a thread, with a tqdm bar that follows the ``Counter`` its workers set; returns (or
    raises) what ``fn`` does."""
    import threading
    from tqdm.auto import tqdm
    counter = Counter.options(scheduling_strategy=on_driver_node()).remote()
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
