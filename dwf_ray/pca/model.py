"""The persisted, sharded PCA that the flow, the generator, conditional runs and analyses load: project weights
to latents and decode latents, shard by shard (files written by ``pca/shards.py``)."""
from __future__ import annotations

import io
import warnings

import numpy as np

from dwf_ray import store
from dwf_ray.pca.reader import model_columns
from dwf_ray.pca.shardfile import Shard, load_shard
from dwf_ray.weights import WeightLayout


class PCAModel:
    """The persisted, sharded PCA: project weights to latents and decode latents, shard by shard.

    Local shard files are memory-mapped, so a loaded model holds no component in memory until it is used.
    """

    def __init__(self, meta: dict, shards: list[Shard]):
        self.meta, self.shards = meta, shards
        self.d, self.k = meta["d"], meta["k"]

    @classmethod
    def load(cls, pca_dir: str) -> "PCAModel":
        meta = store.read_json(store.join(pca_dir, "meta.json"))
        return cls(meta, [load_shard(store.join(pca_dir, s["file"])) for s in meta["shards"]])

    @staticmethod
    def load_latents(pca_dir: str) -> np.ndarray:
        return np.load(io.BytesIO(store.read_bytes(store.join(pca_dir, "latents.npy"))))

    def decode(self, z: np.ndarray) -> np.ndarray:
        """(m, k) latents -> (m, d) flat weights: one matrix product [1, z] @ basis^T per shard.

        The products run in torch, on its thread setting: NumPy's BLAS keeps its own threads spinning after
        each product, which cost a sampling replica 5 to 7 times the CPU of the product itself."""
        import torch
        z = np.atleast_2d(np.asarray(z, dtype=np.float32))
        if z.shape[1] != self.k:
            raise ValueError(f"latents have {z.shape[1]} coordinates, this PCA has k={self.k}")
        z1 = torch.from_numpy(np.hstack([np.ones((len(z), 1), dtype=np.float32), z]))
        with warnings.catch_warnings():   # the bases may be read-only (loaded from bytes): only read here
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.cat([z1 @ torch.from_numpy(s.basis).T for s in self.shards], dim=1).numpy()

    def project(self, x: np.ndarray) -> np.ndarray:
        """(m, d) flat weights -> (m, k): the sum over shards of (x_k - mean_k) V_k."""
        x = np.atleast_2d(np.asarray(x, dtype=np.float32))
        if x.shape[1] != self.d:
            raise ValueError(f"weights have {x.shape[1]} parameters, this PCA has d={self.d}")
        return sum((x[:, s.start:s.stop] - s.mean) @ s.components for s in self.shards)

    def project_checkpoints(self, uris: list[str], layout: WeightLayout, block: int = 1 << 20) -> np.ndarray:
        """(m, k) latents of checkpoints, reading each one's columns shard by shard, never a whole model."""
        sources = [model_columns(u, layout) for u in uris]
        z = np.zeros((len(uris), self.k), dtype=np.float64)
        x = np.empty((len(uris), min(block, self.d)), dtype=np.float32)
        for s in self.shards:
            for a in range(s.start, s.stop, block):
                b = min(a + block, s.stop)
                for row, src in zip(x, sources):
                    src.read(a, b, row[:b - a])
                z += (x[:, :b - a] - s.mean[a - s.start:b - s.start]) @ s.components[a - s.start:b - s.start]
        return z.astype(np.float32)
