"""RowShard: the covariance side (d < n). One actor owns a range of models (rows) and reads them whole.

It returns the (d + 1, d + 1) float64 sum of [Y, 1]^T [Y, 1] over its row blocks, where Y = X - shift (the
shift is one model of the zoo, so that the float32 products carry the spread of the zoo, not its mean): the
top-left d x d block is Y^T Y, the last column the column sums, the corner the row count. The driver adds
these, centres once and takes the eigenvectors; a second pass projects the rows onto them (the latents).
Memory per actor is O(d^2 + block x d): the block size follows the memory budget, not n.
"""
from __future__ import annotations

import time

import numpy as np

from dwf_ray.pca.gram import PROCESS_BYTES, BlockPlan, BlockShard, plan_units


def bytes_per_row(d: int, compute_dtype: str = "float32", engine: str = "numpy") -> int:
    """Bytes a RowShard holds per model of a block with d parameters (k <= d latents)."""
    e = d + 1
    read = 4 * e                    # the float32 row and its column of ones, shifted in place
    work = 0 if engine == "numpy" and compute_dtype == "float32" else 8 * e   # a cast (and device) copy
    return read + work + 8 * e      # + the row's float64 latents (at most d of them)


def fixed_row_bytes(d: int, compute_dtype: str = "float32", engine: str = "numpy") -> int:
    """Bytes a RowShard holds whatever its block: the process, the float64 (d + 1)^2 sum and one product of that
    size before it is added (in the second pass: the (d + 1, k) float64 weights and their cast copy)."""
    product = 4 if compute_dtype == "float32" else 8
    return PROCESS_BYTES[engine] + (8 + product) * (d + 1) ** 2


def plan_rows(rows: int, d: int, budget: int, compute_dtype: str = "float32", engine: str = "numpy") -> BlockPlan:
    """The largest row blocks that keep a RowShard's peak memory under ``budget`` bytes; its models stay in
    memory between the two passes when that fits too. A clear error when the d x d products cannot fit."""
    fixed, per_row = fixed_row_bytes(d, compute_dtype, engine), bytes_per_row(d, compute_dtype, engine)
    plan = plan_units(rows, fixed, per_row, 4 * (d + 1), budget, 1024)
    if plan is None:
        raise ValueError(f"pca.memory_budget_bytes={budget} is too small for the covariance side with d={d} "
                         f"parameters: a row shard needs at least {fixed + per_row} bytes (a {d + 1}^2 float64 "
                         f"sum and its product); raise it, or set pca.side=gram")
    return plan


class RowShard(BlockShard):
    """Owns models [start, stop), every column of each; ``shift`` (d,) is subtracted from every row."""

    PASSES = ("covariance_pass", "latents_pass")

    def __init__(self, sources, start: int, stop: int, plan: BlockPlan, shift: np.ndarray, *args, **kwargs):
        super().__init__(sources, start, stop, plan, *args, **kwargs)
        self.shift = np.asarray(shift, dtype=np.float32)
        self.d = len(self.shift)

    def _block_shape(self, a: int, b: int) -> tuple[int, int]:
        return b - a, self.d + 1

    def _load(self, a: int, b: int, x: np.ndarray) -> None:
        """Read models [a, b) whole, subtract the shift, and set the last column to 1."""
        self._read_rows(range(a, b), 0, self.d, x[:, :self.d])
        x[:, :self.d] -= self.shift
        x[:, self.d] = 1.0

    def products(self) -> np.ndarray:
        """(d + 1, d + 1) float64: the sum over this shard's row blocks of [Y, 1]^T [Y, 1]."""
        acc = np.zeros((self.d + 1, self.d + 1))
        c0 = time.process_time()
        for _, _, x in self._blocks():
            t0 = time.perf_counter()
            self.engine.add_gram(x.T, acc)
            self._time("products", t0)
        self.cpu_seconds["covariance_pass"] += time.process_time() - c0
        return acc

    def latents(self, weights: np.ndarray) -> np.ndarray:
        """(rows, k) float64: [Y, 1] W for this shard's models; with W = [V; -mu_Y V] these are (X - mean) V."""
        z = np.empty((self.stop - self.start, weights.shape[1]))
        c0 = time.process_time()
        for a, _, x in self._blocks():
            t0 = time.perf_counter()
            self.engine.project(x.T, weights, z[a - self.start:a - self.start + len(x)])
            self._time("project", t0)
        self._release("latents_pass", c0)
        return z
