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


def plan_blocks(n: int, columns: int, budget: int, compute_dtype: str = "float32",
                engine: str = "numpy") -> BlockPlan:
    """The largest blocks that keep an actor's peak memory under ``budget`` bytes; the slice stays in memory
    between the two passes when that fits too."""
    fixed = budget_for_block(n, 0, compute_dtype, engine)       # the process, the partial Gram and its terms
    per_column = bytes_per_column(n, compute_dtype, engine)
    room = budget - fixed
    if room < per_column:
        raise ValueError(f"memory budget of {budget} bytes is too small for {n} models: a GramShard needs "
                         f"at least {fixed + per_column} bytes ({PROCESS_BYTES[engine]} for the process itself)")
    streamed = min(columns, room // per_column)
    if streamed == columns:
        return BlockPlan(columns, True, fixed + columns * per_column)
    slice_bytes = 4 * n * columns
    cached = (room - slice_bytes) // (per_column - 4 * n)
    if cached >= min(streamed, 1 << 16):            # caching must not shrink blocks below useful GEMM sizes
        block = min(cached, columns)
        return BlockPlan(block, True, fixed + slice_bytes + block * (per_column - 4 * n))
    return BlockPlan(streamed, False, fixed + streamed * per_column)


class NumpyEngine:
    """Block products on NumPy's BLAS (X X^T is a syrk), in float32 or float64."""

    def __init__(self, compute_dtype: str = "float32", threads: int | None = None):
        from threadpoolctl import threadpool_limits
        self.dtype = np.dtype(compute_dtype)
        if threads:
            threadpool_limits(threads, user_api="blas")

    def gram(self, xc: np.ndarray) -> np.ndarray:
        x = xc.astype(self.dtype, copy=False)
        return (x @ x.T).astype(np.float64, copy=False)

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

    def gram(self, xc: np.ndarray) -> np.ndarray:
        t = self._put(xc)
        return self._mm(t, t.T).double().cpu().numpy()

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


class GramShard:
    """Owns columns [start, stop) of every model; a restarted actor simply reads its slice again."""

    def __init__(self, sources: list[ModelColumns], start: int, stop: int, plan: BlockPlan,
                 engine: str = "numpy", compute_dtype: str = "float32", input_dtype: str = "float32",
                 threads: int | None = None):
        self.sources, self.start, self.stop, self.plan = sources, start, stop, plan
        self.engine = make_engine(engine, compute_dtype, input_dtype, threads)
        self.cache: list | None = None
        self.bytes_read = 0
        self.passes = 0
        self.seconds = {"read_and_centre": 0.0, "gram": 0.0, "project": 0.0, "write_wait": 0.0}   # wall clock
        self.cpu_seconds = {"gram_pass": 0.0, "components_pass": 0.0}      # CPU time of this process
        self.buffers: dict[str, np.ndarray] = {}
        remote = any(not store.is_local(s.uri) for s in sources)    # ranged GETs: many in flight at once
        self.map = ThreadPoolExecutor(16).map if remote else map
        self.rss_at_start = peak_rss()

    def _scratch(self, name: str, shape: tuple[int, int]) -> np.ndarray:
        """A float32 buffer reused from block to block (fresh pages cost more than the data copied into them)."""
        size = shape[0] * shape[1]
        if name not in self.buffers or self.buffers[name].size < size:
            self.buffers[name] = np.empty(size, dtype=np.float32)
        return self.buffers[name][:size].reshape(shape)

    def _centred_blocks(self):
        """Yield (start, mean (b,), centred block (n, b)) in float32: from the cache, or read from the checkpoints."""
        if self.cache is not None:
            yield from self.cache
            return
        cache = [] if self.plan.cache else None
        for a in range(self.start, self.stop, self.plan.block):
            b = min(a + self.plan.block, self.stop)
            t0 = time.perf_counter()
            shape = (len(self.sources), b - a)
            x = np.empty(shape, dtype=np.float32) if cache is not None else self._scratch("block", shape)
            self.bytes_read += sum(self.map(lambda i: self.sources[i].read(a, b, x[i]), range(len(x))))
            mean = x.mean(axis=0, dtype=np.float64).astype(np.float32)
            x -= mean
            self.seconds["read_and_centre"] += time.perf_counter() - t0
            if cache is not None:
                cache.append((a, mean, x))
            yield a, mean, x
        self.passes += 1
        self.cache = cache

    def gram(self) -> np.ndarray:
        """This slice's centred Gram matrix (n, n) in float64: the sum over blocks of X_c X_c^T."""
        n = len(self.sources)
        g = np.zeros((n, n))
        c0 = time.process_time()
        for _, _, x in self._centred_blocks():
            t0 = time.perf_counter()
            g += self.engine.gram(x)
            self.seconds["gram"] += time.perf_counter() - t0
        self.cpu_seconds["gram_pass"] += time.process_time() - c0
        return g

    def components(self, weights: np.ndarray, out_uri: str) -> str:
        """Write V = X_c^T W (with W = U Lambda^-1/2) and the mean as one shard file, block by block."""
        k = weights.shape[1]
        c0 = time.process_time()
        with write_shard(out_uri, self.start, self.stop, k) as put:
            for i, (a, mean, x) in enumerate(self._centred_blocks()):
                t0 = time.perf_counter()
                rows = self._scratch(f"rows{i % 2}", (x.shape[1], 1 + k))   # the other one may be being written
                rows[:, 0] = mean
                self.engine.project(x, weights, rows[:, 1:])
                t1 = time.perf_counter()
                put(rows)
                self.seconds["project"] += t1 - t0
                self.seconds["write_wait"] += time.perf_counter() - t1
        self.cache, self.buffers = None, {}     # the slice is not needed any more
        self.cpu_seconds["components_pass"] += time.process_time() - c0
        return out_uri

    def stats(self) -> dict:
        return {"start": self.start, "stop": self.stop, "bytes_read": self.bytes_read, "passes": self.passes,
                "block": self.plan.block, "cached": self.plan.cache, "planned_bytes": self.plan.bytes,
                "pid": os.getpid(), "peak_rss_bytes": peak_rss(), "rss_at_start_bytes": self.rss_at_start,
                "seconds": dict(self.seconds), "cpu_seconds": dict(self.cpu_seconds)}
