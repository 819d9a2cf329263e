"""Distributed PCA on the smaller side of the zoo (the fit; ``pca/model.py`` loads its output).

n < d (the Gram side): GramShard actors each own one column slice of the zoo; the driver solves the n x n problem
and the actors write their slices of the components. d < n (the covariance side): RowShard actors each own a
range of models; the driver sums their d x d products, solves the d x d problem, the actors project their models
(the latents), and the driver writes the components. Both give the same files, components and latents (signs by
``dual.latent_signs``): ``shard_XXX.safetensors`` (mean and components of one column range, see shardfile.py),
``latents.npy`` (n, k) and ``meta.json`` (with ``side``: which one ran).
"""
from __future__ import annotations

import io
import time
from contextlib import contextmanager
from typing import Callable

import numpy as np
import ray
from tqdm.auto import tqdm

from dwf_ray import store
from dwf_ray.config import PCAConfig
from dwf_ray.pca.covariance import covariance_eigen, orient, projection_weights
from dwf_ray.pca.dual import centre_gram, component_weights, latents, oriented, top_eigen
from dwf_ray.pca.gram import GramShard, plan_blocks
from dwf_ray.pca.reader import model_columns
from dwf_ray.pca.rows import RowShard, plan_rows
from dwf_ray.pca.shardfile import write_shard
from dwf_ray.weights import WeightLayout


def shard_ranges(d: int, n_shards: int) -> list[tuple[int, int]]:
    edges = np.linspace(0, d, n_shards + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def choose_side(n: int, d: int, side: str = "auto") -> str:
    """"gram" (n x n) or "covariance" (d x d): the smaller problem unless ``side`` names one."""
    return ("gram" if n <= d else "covariance") if side == "auto" else side


def check_fits(n: int, d: int, cfg: PCAConfig) -> None:
    """Before any work: a zoo of n models of d parameters fits the PCA's memory budget on the side it would use
    (a ValueError naming pca.memory_budget_bytes otherwise)."""
    engine = _checked_engine(cfg)
    if choose_side(n, d, cfg.side) == "gram":
        columns = max(b - a for a, b in shard_ranges(d, cfg.n_shards))
        plan_blocks(n, columns, cfg.memory_budget_bytes, cfg.compute_dtype, engine)
    else:
        rows = max(b - a for a, b in shard_ranges(n, cfg.n_shards))
        plan_rows(rows, d, cfg.memory_budget_bytes, cfg.compute_dtype, engine)


def _checked_engine(cfg: PCAConfig) -> str:
    """The engine the PCA runs on, once its input dtype is known to work with it (a ValueError naming the keys
    otherwise)."""
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


class _Clock:
    """Wall seconds of each step of a fit, as the driver sees them (meta.json "seconds")."""

    def __init__(self):
        self.last, self.seconds = time.perf_counter(), {}

    def lap(self, step: str) -> None:
        now = time.perf_counter()
        self.seconds[step] = round(now - self.last, 3)
        self.last = now


@contextmanager
def _actors(cls, cfg: PCAConfig, args: list[tuple]):
    """One actor of ``cls`` per argument tuple (restarted up to ``cfg.max_restarts`` times); killed on exit.
    A call is retried for as long as its actor can still restart: a node that dies may use up bounded task retries
    before Ray has declared it dead and restarted the actor elsewhere."""
    actor_cls = ray.remote(cls).options(num_cpus=cfg.shard_cpus, num_gpus=cfg.shard_gpus,
                                        max_restarts=cfg.max_restarts, max_task_retries=-1)
    actors = [actor_cls.remote(*a) for a in args]
    try:
        yield actors
    finally:
        for a in actors:
            ray.kill(a)


def _fit_gram(sources: list, n: int, d: int, cfg: PCAConfig, engine: str, out_dir: str, on_stage: Callable):
    """Column slices: partial Gram matrices, eigh of the n x n matrix, components written by the actors."""
    sources_ref = ray.put(sources)      # held here for the whole fit, so that a restarted actor finds it
    clock = _Clock()
    ranges = shard_ranges(d, cfg.n_shards)
    plans = [plan_blocks(n, b - a, cfg.memory_budget_bytes, cfg.compute_dtype, engine) for a, b in ranges]
    threads = max(1, int(cfg.shard_cpus))
    with _actors(GramShard, cfg, [(sources_ref, a, b, plan, engine, cfg.compute_dtype, cfg.input_dtype, threads)
                                  for (a, b), plan in zip(ranges, plans)]) as actors:
        on_stage("gram", actors)
        gram = _sum_as_ready([a.gram.remote() for a in actors], "pca: partial Gram matrices")
        clock.lap("products")
        eig = oriented(top_eigen(centre_gram(gram), cfg.k, cfg.variance_target, cfg.max_k))
        clock.lap("eigh")
        on_stage("components", actors)
        files = [f"shard_{i:03d}.safetensors" for i in range(len(actors))]   # relative to out_dir
        weights = component_weights(eig)
        ray.get([a.components.remote(weights, store.join(out_dir, f)) for a, f in zip(actors, files)])
        clock.lap("second_pass")
        stats = ray.get([a.stats.remote() for a in actors])
    return eig, latents(eig), {"shards": [s | {"file": f} for s, f in zip(stats, files)], "seconds": clock.seconds}


def _fit_covariance(sources: list, n: int, d: int, cfg: PCAConfig, engine: str, out_dir: str,
                    on_stage: Callable):
    """Row ranges: partial (d + 1)^2 products, eigh of the d x d covariance, latents projected by the actors,
    components written here."""
    sources_ref = ray.put(sources)      # held here for the whole fit, so that a restarted actor finds it
    clock = _Clock()
    shift = np.empty(d, dtype=np.float32)
    sources[0].read(0, d, shift)        # model 0: the float32 products then carry the zoo's spread, not its mean
    ranges = shard_ranges(n, cfg.n_shards)
    plans = [plan_rows(b - a, d, cfg.memory_budget_bytes, cfg.compute_dtype, engine) for a, b in ranges]
    threads = max(1, int(cfg.shard_cpus))
    with _actors(RowShard, cfg, [(sources_ref, a, b, plan, shift, engine, cfg.compute_dtype, cfg.input_dtype,
                                  threads) for (a, b), plan in zip(ranges, plans)]) as actors:
        on_stage("covariance", actors)
        sums = _sum_as_ready([a.products.remote() for a in actors], "pca: partial covariance products")
        clock.lap("products")
        mu, eig = covariance_eigen(sums, cfg.k, cfg.variance_target, cfg.max_k)
        del sums
        clock.lap("eigh")
        on_stage("latents", actors)
        weights = projection_weights(eig, mu)
        z = np.concatenate(ray.get([a.latents.remote(weights) for a in actors]))
        clock.lap("second_pass")
        stats = ray.get([a.stats.remote() for a in actors])
    eig, z = orient(eig, z)
    mean = (shift + mu).astype(np.float32)
    shards = []
    for i, (a, b) in enumerate(shard_ranges(d, cfg.n_shards)):
        shards.append({"start": a, "stop": b, "file": f"shard_{i:03d}.safetensors"})
        with write_shard(store.join(out_dir, shards[-1]["file"]), a, b, len(eig.values)) as put:
            put(np.hstack([mean[a:b, None], eig.vectors[a:b]]).astype(np.float32))
    clock.lap("write")
    return eig, z, {"shards": shards, "row_shards": stats, "seconds": clock.seconds}


def fit_distributed_pca(uris: list[str], model_ids: list[str], layout: WeightLayout, cfg: PCAConfig,
                        out_dir: str, on_stage: Callable[[str, list], None] | None = None) -> dict:
    """Fit PCA on the side ``cfg.side`` picks with ``cfg.n_shards`` actors; writes shards, latents and meta under
    ``out_dir``.

    Each actor reads only its part of every checkpoint: once for the products, and once more for the second pass
    (components or latents) unless its part fits its memory budget. ``on_stage(stage, actors)`` is called before
    each pass ("gram" and "components", or "covariance" and "latents"; progress hooks, and the fault-tolerance
    tests kill an actor there).
    """
    n, d = len(uris), layout.size
    if n < 2:
        raise ValueError(f"PCA needs at least 2 models, got {n}")
    if len(model_ids) != n:
        raise ValueError(f"{len(model_ids)} model ids for {n} checkpoints")
    if d == 0:
        raise ValueError("the weight layout has no parameters")
    engine = _checked_engine(cfg)
    sources = [model_columns(u, layout) for u in uris]      # every header checked before any actor starts
    side = choose_side(n, d, cfg.side)
    fit = _fit_gram if side == "gram" else _fit_covariance
    eig, z, files = fit(sources, n, d, cfg, engine, out_dir, on_stage or (lambda stage, actors: None))
    buf = io.BytesIO()
    np.save(buf, z.astype(np.float32))
    store.write_bytes(store.join(out_dir, "latents.npy"), buf.getvalue())
    meta = {"n": n, "d": d, "k": len(eig.values), "side": side, "model_ids": list(model_ids),
            "eigenvalues": eig.values.tolist(), "total_variance": eig.total / (n - 1),
            "explained_variance_ratio": eig.explained_variance_ratio.tolist(),
            "explained_variance_total": float(eig.explained_variance_ratio.sum()),
            "k_rule": {"k": cfg.k, "variance_target": cfg.variance_target, "max_k": cfg.max_k},
            "engine": engine, "compute_dtype": cfg.compute_dtype, "input_dtype": cfg.input_dtype,
            "memory_budget_bytes": cfg.memory_budget_bytes,
            # file names relative to the PCA folder, so a run root can be moved or copied
            **files}
    store.write_json(store.join(out_dir, "meta.json"), meta)
    return meta
