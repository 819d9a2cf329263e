"""Distributed dual PCA: GramShard actors each own one column slice of the zoo."""
from __future__ import annotations

import io

import numpy as np
import ray
from tqdm.auto import tqdm

from dwf_ray import store
from dwf_ray.config import PCAConfig
from dwf_ray.pca.dual import Eigen, slice_components, top_eigen
from dwf_ray.weights import WeightLayout, read_flat_range, read_header


def shard_ranges(d: int, n_shards: int) -> list[tuple[int, int]]:
    edges = np.linspace(0, d, n_shards + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def save_shard(uri: str, start: int, stop: int, mean: np.ndarray, components: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez(buf, start=start, stop=stop, mean=mean.astype(np.float32), components=components.astype(np.float32))
    store.write_bytes(uri, buf.getvalue())


def load_shard(uri: str) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(store.read_bytes(uri))) as z:
        return {k: z[k] for k in z.files}


class GramShard:
    """Owns columns [start, stop) of every model: reads them once, returns its centred partial Gram.

    Columns are read and multiplied in blocks of ``block_columns``; the slice is kept in memory when it
    fits ``cache_bytes`` (else the components pass reads it a second time).
    """

    def __init__(self, uris: list[str], layout_entries: list, start: int, stop: int,
                 block_columns: int, cache_bytes: int = 2 << 30):
        self.uris, self.start, self.stop = uris, start, stop
        self.layout = WeightLayout(layout_entries)
        self.block = max(1, block_columns)
        self.cache_bytes = cache_bytes
        self.headers: dict[str, tuple[dict, int]] = {}
        self.cache: list[np.ndarray] | None = None
        self.mean = np.zeros(stop - start)
        self.have_mean = False
        self.bytes_read = 0

    def _blocks(self):
        for a in range(self.start, self.stop, self.block):
            yield a, min(a + self.block, self.stop)

    def _read_block(self, a: int, b: int) -> np.ndarray:
        rows = []
        for uri in self.uris:
            if uri not in self.headers:
                self.headers[uri] = read_header(uri)
            rows.append(read_flat_range(uri, self.layout, a, b, header=self.headers[uri]))
        self.bytes_read += 4 * len(self.uris) * (b - a)
        return np.stack(rows)

    def _iter_slice(self):
        if self.cache is not None:
            yield from zip(self._blocks(), self.cache)
            return
        keep = 4 * len(self.uris) * (self.stop - self.start) <= self.cache_bytes
        cache = []
        for a, b in self._blocks():
            x = self._read_block(a, b)
            if keep:
                cache.append(x)
            yield (a, b), x
        if keep:
            self.cache = cache

    def gram(self) -> np.ndarray:
        """Centred partial Gram X_k,c X_k,c^T in float64; also records the column means."""
        n = len(self.uris)
        g = np.zeros((n, n))
        for (a, b), x in self._iter_slice():
            x64 = x.astype(np.float64)
            mu = x64.mean(axis=0)
            self.mean[a - self.start:b - self.start] = mu
            xc = x64 - mu
            g += xc @ xc.T
        self.have_mean = True
        return g

    def components(self, values: np.ndarray, vectors: np.ndarray, total: float, out_uri: str) -> str:
        if not self.have_mean:  # a restarted actor recomputes its shard first
            self.gram()
        eig = Eigen(values, vectors, total)
        parts = [slice_components(x, self.mean[a - self.start:b - self.start], eig)
                 for (a, b), x in self._iter_slice()]
        save_shard(out_uri, self.start, self.stop, self.mean, np.concatenate(parts))
        return out_uri

    def stats(self) -> dict:
        return {"start": self.start, "stop": self.stop, "bytes_read": self.bytes_read}


def fit_distributed_pca(uris: list[str], model_ids: list[str], layout: WeightLayout, cfg: PCAConfig,
                        out_dir: str) -> dict:
    """Fit dual PCA with ``cfg.n_shards`` GramShard actors; writes shards, latents and meta under ``out_dir``."""
    n = len(uris)
    if n < 2:
        raise ValueError(f"PCA needs at least 2 models, got {n}")
    ranges = shard_ranges(layout.size, cfg.n_shards)
    actor_cls = ray.remote(GramShard).options(num_cpus=cfg.shard_cpus, num_gpus=cfg.shard_gpus,
                                               max_restarts=2, max_task_retries=2)
    actors = [actor_cls.remote(uris, layout.entries, a, b, cfg.block_columns) for a, b in ranges]
    grams = [a.gram.remote() for a in actors]
    total = np.zeros((n, n))
    for ref in tqdm(grams, desc="pca: partial Gram matrices", unit="shard"):
        total += ray.get(ref)
    eig = top_eigen(total, cfg.k, cfg.variance_target)
    shard_uris = [store.join(out_dir, f"shard_{i:03d}.npz") for i in range(len(actors))]
    ray.get([a.components.remote(eig.values, eig.vectors, eig.total, u) for a, u in zip(actors, shard_uris)])
    stats = ray.get([a.stats.remote() for a in actors])
    for a in actors:
        ray.kill(a)
    z = eig.vectors * np.sqrt(eig.values)
    buf = io.BytesIO()
    np.save(buf, z.astype(np.float32))
    store.write_bytes(store.join(out_dir, "latents.npy"), buf.getvalue())
    meta = {"n": n, "d": layout.size, "k": len(eig.values), "model_ids": list(model_ids),
            "eigenvalues": eig.values.tolist(), "total_variance": eig.total / (n - 1),
            "explained_variance_ratio": eig.explained_variance_ratio.tolist(),
            "explained_variance_total": float(eig.explained_variance_ratio.sum()),
            "shards": [{"start": s["start"], "stop": s["stop"], "uri": u, "bytes_read": s["bytes_read"]}
                       for s, u in zip(stats, shard_uris)]}
    store.write_json(store.join(out_dir, "meta.json"), meta)
    return meta


class PCAModel:
    """The persisted, sharded PCA: project weights to latents, decode latents to weights, one shard at a time."""

    def __init__(self, meta: dict, shards: list[dict[str, np.ndarray]]):
        self.meta, self.shards = meta, shards
        self.d, self.k = meta["d"], meta["k"]

    @classmethod
    def load(cls, pca_dir: str) -> "PCAModel":
        meta = store.read_json(store.join(pca_dir, "meta.json"))
        return cls(meta, [load_shard(s["uri"]) for s in meta["shards"]])

    @staticmethod
    def load_latents(pca_dir: str) -> np.ndarray:
        return np.load(io.BytesIO(store.read_bytes(store.join(pca_dir, "latents.npy"))))

    def decode(self, z: np.ndarray) -> np.ndarray:
        """(m, k) latents -> (m, d) flat weights: one matrix product per shard."""
        z = np.atleast_2d(np.asarray(z, dtype=np.float32))
        return np.concatenate([s["mean"] + z @ s["components"].T for s in self.shards], axis=1)

    def project(self, x: np.ndarray) -> np.ndarray:
        """(m, d) flat weights -> (m, k): the sum over shards of (x_k - mean_k) V_k."""
        x = np.atleast_2d(np.asarray(x, dtype=np.float32))
        return sum((x[:, int(s["start"]):int(s["stop"])] - s["mean"]) @ s["components"] for s in self.shards)
