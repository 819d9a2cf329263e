"""GramShard: one actor's column slice of the zoo, read from the checkpoints and multiplied block by block.

Memory per actor is O(n x block + n^2): the block size follows a memory budget, not d. The slice stays in
memory between the Gram pass and the components pass only when it fits that budget; otherwise the
components pass reads it once more. Products run on NumPy's BLAS, or on torch (a GPU when the actor has
one); blocks are summed in float64, and no product accumulates in float16.
"""
from __future__ import annotations

import os
import resource
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from dwf_ray import store
from dwf_ray.pca.reader import ModelColumns
from dwf_ray.pca.shardfile import write_shard


@dataclass(frozen=True)
class BlockPlan:
    block: int      # columns read and multiplied at once
    cache: bool     # keep the whole slice in memory between the two passes
    bytes: int      # planned peak memory of the actor process, at most the budget it was planned against


# Resident memory of an actor before its arrays: interpreter, Ray worker, NumPy and BLAS buffers (about
# 0.2 GB measured here), plus torch and its allocator for the torch engine.
PROCESS_BYTES = {"numpy": 320 << 20, "torch": 1 << 30}


def bytes_per_column(n: int, compute_dtype: str = "float32", engine: str = "numpy") -> int:
    """Bytes an actor holds per column of a block, for n models (k < n components)."""
    read = 4 * n                    # the float32 block, centred in place
    rows = 2 * 4 * n                # two (block, 1 + k) float32 row buffers: one is filled while one is written
    if engine == "numpy" and compute_dtype == "float32":
        work = 0                    # X X^T reads the block as is; X^T W is written straight into the rows
    elif engine == "numpy":
        work = 8 * n + 8 * n        # the float64 copy of the block, the float64 X^T W
    else:
        work = 8 * n + 8 * n        # torch: cast (and device) copies of the block, X^T W before it is copied out
    return read + rows + work + 12  # + the block's mean


def budget_for_block(n: int, block: int, compute_dtype: str = "float32", engine: str = "numpy") -> int:
    """The memory budget of an actor that streams blocks of ``block`` columns for n models."""
    return PROCESS_BYTES[engine] + 4 * 8 * n * n + block * bytes_per_column(n, compute_dtype, engine)


def plan_units(units: int, fixed: int, per_unit: int, read_per_unit: int, budget: int,
               min_cached_block: int) -> BlockPlan | None:
    """The largest blocks of ``units`` (columns or rows) that keep an actor's peak memory under ``budget``:
    ``fixed`` bytes whatever the block, ``per_unit`` bytes per unit of a block, of which ``read_per_unit`` is
    the block read from the checkpoints. The whole slice stays in memory between the two passes when that fits
    with blocks of at least ``min_cached_block`` units. None when not even one unit fits."""
    room = budget - fixed
    if room < per_unit:
        return None
    streamed = min(units, room // per_unit)
    if streamed == units:
        return BlockPlan(units, True, fixed + units * per_unit)
    slice_bytes = read_per_unit * units
    cached = (room - slice_bytes) // (per_unit - read_per_unit)
    if cached >= min(streamed, min_cached_block):   # caching must not shrink blocks below useful GEMM sizes
        block = min(cached, units)
        return BlockPlan(block, True, fixed + slice_bytes + block * (per_unit - read_per_unit))
    return BlockPlan(streamed, False, fixed + streamed * per_unit)


def plan_blocks(n: int, columns: int, budget: int, compute_dtype: str = "float32",
                engine: str = "numpy") -> BlockPlan:
    """The largest column blocks that keep a GramShard's peak memory under ``budget`` bytes; the slice stays in
    memory between the two passes when that fits too."""
    fixed = budget_for_block(n, 0, compute_dtype, engine)       # the process, the partial Gram and its terms
    per_column = bytes_per_column(n, compute_dtype, engine)
    plan = plan_units(columns, fixed, per_column, 4 * n, budget, 1 << 16)
    if plan is None:
        raise ValueError(f"memory budget of {budget} bytes is too small for {n} models: a GramShard needs "
                         f"at least {fixed + per_column} bytes ({PROCESS_BYTES[engine]} for the process itself)")
    return plan


class NumpyEngine:
    """Block products on NumPy's BLAS (X X^T is a syrk), in float32 or float64. Both sides call them: the
    Gram side with column blocks (n, b), the covariance side with transposed row blocks (d + 1, b)."""

    def __init__(self, compute_dtype: str = "float32", threads: int | None = None):
        from threadpoolctl import threadpool_limits
        self.dtype = np.dtype(compute_dtype)
        if threads:
            threadpool_limits(threads, user_api="blas")

    def add_gram(self, xc: np.ndarray, acc: np.ndarray) -> None:
        """acc (float64) += X X^T, the product cast in chunks as it is added (no float64 copy of it)."""
        x = xc.astype(self.dtype, copy=False)
        np.add(acc, x @ x.T, out=acc)

    def project(self, xc: np.ndarray, weights: np.ndarray, out: np.ndarray) -> None:
        """out (b, k) = X_c^T W."""
        x = xc.astype(self.dtype, copy=False)
        if self.dtype == out.dtype:
            np.matmul(x.T, weights.astype(self.dtype), out=out)
        else:
            out[:] = x.T @ weights.astype(self.dtype)


class TorchEngine:
    """Block products with torch on ``device`` (CUDA for an actor with a GPU; "cpu" runs the same code).

    Inputs may be cast to bfloat16/float16; products then accumulate in float32 (``out_dtype`` on CUDA; on the
    CPU, which has no mixed-precision GEMM, the same rounded inputs are multiplied in float32).
    """

    def __init__(self, compute_dtype: str = "float32", input_dtype: str = "float32", device: str = "cpu",
                 threads: int | None = None):
        import torch
        self.torch = torch
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.acc = getattr(torch, compute_dtype)
        self.input = getattr(torch, input_dtype) if compute_dtype == "float32" else self.acc

    def _put(self, a: np.ndarray):
        t = self.torch.from_numpy(a).to(self.device).to(self.input)
        return t if t.device.type == "cuda" else t.to(self.acc)

    def _mm(self, a, b):
        return a @ b if a.dtype == self.acc else self.torch.mm(a, b, out_dtype=self.acc)

    def add_gram(self, xc: np.ndarray, acc: np.ndarray) -> None:
        t = self._put(xc)
        np.add(acc, self._mm(t, t.T).cpu().numpy(), out=acc)

    def project(self, xc: np.ndarray, weights: np.ndarray, out: np.ndarray) -> None:
        out[:] = self._mm(self._put(xc).T, self._put(weights.astype(np.float32))).cpu().numpy()


def make_engine(engine: str, compute_dtype: str, input_dtype: str, threads: int | None):
    """``engine`` is "numpy" or "torch" (CUDA when this process sees a GPU, else the CPU); ``threads`` for
    the products (None: leave this process's setting alone)."""
    if engine == "numpy":
        return NumpyEngine(compute_dtype, threads)
    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return TorchEngine(compute_dtype, input_dtype, device, threads)


def peak_rss() -> int:
    """Peak resident memory of this process in bytes (VmHWM: unlike ru_maxrss, not inherited across exec)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # KiB on Linux


class BlockShard:
    """What GramShard (a column slice of every model) and RowShard (every column of a range of models) share:
    blocks of [start, stop) read from the checkpoints, kept in memory between the two passes when the plan
    says so, and counts of bytes, passes and seconds. A restarted actor simply reads its blocks again."""

    PASSES = ("first_pass", "second_pass")      # names of the two passes in ``cpu_seconds``

    def __init__(self, sources: list[ModelColumns], start: int, stop: int, plan: BlockPlan,
                 engine: str = "numpy", compute_dtype: str = "float32", input_dtype: str = "float32",
                 threads: int | None = None):
        self.sources, self.start, self.stop, self.plan = sources, start, stop, plan
        self.engine = make_engine(engine, compute_dtype, input_dtype, threads)
        self.cache: list | None = None
        self.bytes_read = 0
        self.passes = 0
        self.seconds: dict[str, float] = {}                         # wall clock of each step
        self.cpu_seconds = dict.fromkeys(self.PASSES, 0.0)          # CPU time of this process in each pass
        self.buffers: dict[str, np.ndarray] = {}
        remote = any(not store.is_local(s.uri) for s in sources)    # ranged GETs: many in flight at once
        self.map = ThreadPoolExecutor(16).map if remote else map
        self.rss_at_start = peak_rss()

    def _time(self, step: str, t0: float) -> float:
        now = time.perf_counter()
        self.seconds[step] = self.seconds.get(step, 0.0) + now - t0
        return now

    def _scratch(self, name: str, shape: tuple[int, int]) -> np.ndarray:
        """A float32 buffer reused from block to block (fresh pages cost more than the data copied into them)."""
        size = shape[0] * shape[1]
        if name not in self.buffers or self.buffers[name].size < size:
            self.buffers[name] = np.empty(size, dtype=np.float32)
        return self.buffers[name][:size].reshape(shape)

    def _load(self, a: int, b: int, x: np.ndarray):
        """Fill the float32 block ``x`` with units [a, b) and prepare it in place; returns what the block carries
        besides (the Gram side: its column means)."""
        raise NotImplementedError

    def _block_shape(self, a: int, b: int) -> tuple[int, int]:
        raise NotImplementedError

    def _blocks(self):
        """Yield (start, extra, block) of every block: from the cache, or read from the checkpoints."""
        if self.cache is not None:
            yield from self.cache
            return
        cache = [] if self.plan.cache else None
        for a in range(self.start, self.stop, self.plan.block):
            b = min(a + self.plan.block, self.stop)
            t0 = time.perf_counter()
            shape = self._block_shape(a, b)
            x = np.empty(shape, dtype=np.float32) if cache is not None else self._scratch("block", shape)
            extra = self._load(a, b, x)
            self._time("read", t0)
            if cache is not None:
                cache.append((a, extra, x))
            yield a, extra, x
        self.passes += 1
        self.cache = cache

    def _read_rows(self, rows: range, start: int, stop: int, x: np.ndarray) -> None:
        """x[i] = columns [start, stop) of model rows[i]."""
        self.bytes_read += sum(self.map(lambda i: self.sources[rows[i]].read(start, stop, x[i]), range(len(x))))

    def _release(self, pass_name: str, c0: float) -> None:
        """End of the second pass: the slice is not needed any more."""
        self.cache, self.buffers = None, {}
        self.cpu_seconds[pass_name] += time.process_time() - c0

    def stats(self) -> dict:
        return {"start": self.start, "stop": self.stop, "bytes_read": self.bytes_read, "passes": self.passes,
                "block": self.plan.block, "cached": self.plan.cache, "planned_bytes": self.plan.bytes,
                "pid": os.getpid(), "peak_rss_bytes": peak_rss(), "rss_at_start_bytes": self.rss_at_start,
                "seconds": dict(self.seconds), "cpu_seconds": dict(self.cpu_seconds)}


class GramShard(BlockShard):
    """Owns columns [start, stop) of every model: the partial Gram matrix, then its slice of the components."""

    PASSES = ("gram_pass", "components_pass")

    def _block_shape(self, a: int, b: int) -> tuple[int, int]:
        return len(self.sources), b - a

    def _load(self, a: int, b: int, x: np.ndarray) -> np.ndarray:
        """Read columns [a, b) of every model and centre them; returns their mean (float32)."""
        self._read_rows(range(len(self.sources)), a, b, x)
        mean = x.mean(axis=0, dtype=np.float64).astype(np.float32)
        x -= mean
        return mean

    def gram(self) -> np.ndarray:
        """This slice's centred Gram matrix (n, n) in float64: the sum over blocks of X_c X_c^T."""
        n = len(self.sources)
        g = np.zeros((n, n))
        c0 = time.process_time()
        for _, _, x in self._blocks():
            t0 = time.perf_counter()
            self.engine.add_gram(x, g)
            self._time("gram", t0)
        self.cpu_seconds["gram_pass"] += time.process_time() - c0
        return g

    def components(self, weights: np.ndarray, out_uri: str) -> str:
        """Write V = X_c^T W (with W = U Lambda^-1/2) and the mean as one shard file, block by block."""
        k = weights.shape[1]
        c0 = time.process_time()
        with write_shard(out_uri, self.start, self.stop, k) as put:
            for i, (a, mean, x) in enumerate(self._blocks()):
                t0 = time.perf_counter()
                rows = self._scratch(f"rows{i % 2}", (x.shape[1], 1 + k))   # the other one may be being written
                rows[:, 0] = mean
                self.engine.project(x, weights, rows[:, 1:])
                t1 = self._time("project", t0)
                put(rows)
                self._time("write_wait", t1)
        self._release("components_pass", c0)
        return out_uri
