"""Distributed dual PCA: GramShard actors each own one column slice of the zoo; the driver solves the n x n problem.

Files under the output folder: ``shard_XXX.safetensors`` (mean and components of one column range, see
shardfile.py), ``latents.npy`` (n, k) and ``meta.json``.
"""
from __future__ import annotations

import io
from typing import Callable

import numpy as np
import ray
from tqdm.auto import tqdm

from dwf_ray import store
from dwf_ray.archs import ArchSpec
from dwf_ray.config import PCAConfig, RunConfig
from dwf_ray.pca.dual import centre_gram, component_weights, latents, top_eigen
from dwf_ray.pca.gram import GramShard, plan_blocks
from dwf_ray.pca.reader import model_columns
from dwf_ray.pca.shardfile import Shard, load_shard
from dwf_ray.store import RunStore
from dwf_ray.weights import WeightLayout


def shard_ranges(d: int, n_shards: int) -> list[tuple[int, int]]:
    edges = np.linspace(0, d, n_shards + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def _check(cfg: PCAConfig) -> str:
    engine = cfg.resolved_engine()
    if cfg.input_dtype != "float32" and (engine != "torch" or cfg.compute_dtype != "float32"):
        raise ValueError(f"pca.input_dtype={cfg.input_dtype} needs the torch engine (engine=torch, or auto with "
                         f"shard_gpus > 0) and compute_dtype=float32; got engine={engine}, "
                         f"compute_dtype={cfg.compute_dtype}")
    return engine


def _sum_as_ready(refs: list, desc: str) -> np.ndarray:
    total, pending = None, list(refs)
    with tqdm(total=len(refs), desc=desc, unit="shard") as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            g = ray.get(done[0])
            total = g if total is None else total + g
            bar.update(1)
    return total


def fit_distributed_pca(uris: list[str], model_ids: list[str], layout: WeightLayout, cfg: PCAConfig,
                        out_dir: str, on_stage: Callable[[str, list], None] | None = None) -> dict:
    """Fit dual PCA with ``cfg.n_shards`` GramShard actors; writes shards, latents and meta under ``out_dir``.

    Each actor reads only its columns of every checkpoint: once for the Gram matrix, and once more for the
    components unless its slice fits its memory budget. ``on_stage(stage, actors)`` is called before the
    "gram" and the "components" pass (progress hooks; the fault-tolerance test kills an actor there).
    """
    n = len(uris)
    if n < 2:
        raise ValueError(f"PCA needs at least 2 models, got {n}")
    if len(model_ids) != n:
        raise ValueError(f"{len(model_ids)} model ids for {n} checkpoints")
    if layout.size == 0:
        raise ValueError("the weight layout has no parameters")
    engine = _check(cfg)
    sources = [model_columns(u, layout) for u in uris]      # every header checked before any actor starts
    ranges = shard_ranges(layout.size, cfg.n_shards)
    plans = [plan_blocks(n, b - a, cfg.memory_budget_bytes, cfg.compute_dtype, engine) for a, b in ranges]
    actor_cls = ray.remote(GramShard).options(num_cpus=cfg.shard_cpus, num_gpus=cfg.shard_gpus,
                                               max_restarts=cfg.max_restarts, max_task_retries=cfg.max_restarts)
    threads = max(1, int(cfg.shard_cpus))
    sources_ref = ray.put(sources)      # held here for the whole fit, so that a restarted actor finds it
    actors = [actor_cls.remote(sources_ref, a, b, plan, engine, cfg.compute_dtype, cfg.input_dtype, threads)
              for (a, b), plan in zip(ranges, plans)]
    try:
        if on_stage:
            on_stage("gram", actors)
        gram = _sum_as_ready([a.gram.remote() for a in actors], "pca: partial Gram matrices")
        eig = top_eigen(centre_gram(gram), cfg.k, cfg.variance_target)
        if on_stage:
            on_stage("components", actors)
        shard_files = [f"shard_{i:03d}.safetensors" for i in range(len(actors))]   # relative to out_dir
        weights = component_weights(eig)
        ray.get([a.components.remote(weights, store.join(out_dir, f)) for a, f in zip(actors, shard_files)])
        stats = ray.get([a.stats.remote() for a in actors])
    finally:
        for a in actors:
            ray.kill(a)
    buf = io.BytesIO()
    np.save(buf, latents(eig).astype(np.float32))
    store.write_bytes(store.join(out_dir, "latents.npy"), buf.getvalue())
    meta = {"n": n, "d": layout.size, "k": len(eig.values), "model_ids": list(model_ids),
            "eigenvalues": eig.values.tolist(), "total_variance": eig.total / (n - 1),
            "explained_variance_ratio": eig.explained_variance_ratio.tolist(),
            "explained_variance_total": float(eig.explained_variance_ratio.sum()),
            "engine": engine, "compute_dtype": cfg.compute_dtype, "input_dtype": cfg.input_dtype,
            "memory_budget_bytes": cfg.memory_budget_bytes,
            # file names relative to the PCA folder, so a run root can be moved or copied
            "shards": [s | {"file": f} for s, f in zip(stats, shard_files)]}
    store.write_json(store.join(out_dir, "meta.json"), meta)
    return meta


def run_pca(cfg: RunConfig, st: RunStore) -> dict:
    """The pca stage: dual PCA of the usable canonical models; writes pca/."""
    ok = store.ok_rows(st.manifest("canon"))
    meta = fit_distributed_pca(list(ok["canon_uri"]), list(ok["model_id"]), WeightLayout.from_arch(
        ArchSpec.parse(cfg.zoo.arch)), cfg.pca, st.stage_uri("pca"))
    return {"n": meta["n"], "d": meta["d"], "k": meta["k"],
            "explained_variance_total": meta["explained_variance_total"]}


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
        """(m, k) latents -> (m, d) flat weights: one matrix product [1, z] @ basis^T per shard."""
        z = np.atleast_2d(np.asarray(z, dtype=np.float32))
        if z.shape[1] != self.k:
            raise ValueError(f"latents have {z.shape[1]} coordinates, this PCA has k={self.k}")
        z1 = np.hstack([np.ones((len(z), 1), dtype=np.float32), z])
        return np.concatenate([z1 @ s.basis.T for s in self.shards], axis=1)

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
