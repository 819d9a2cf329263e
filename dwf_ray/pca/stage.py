"""The pca stage: PCA of the run's usable canonical models into pca/."""
from __future__ import annotations

from dwf_ray import store
from dwf_ray.archs import ArchSpec
from dwf_ray.config import RunConfig
from dwf_ray.pca.shards import fit_distributed_pca
from dwf_ray.store import RunStore
from dwf_ray.weights import WeightLayout


def run_pca(cfg: RunConfig, run_store: RunStore) -> dict:
    """The pca stage: PCA of the usable canonical models; writes pca/ and prints the variance kept."""
    ok = store.ok_rows(run_store.manifest("canon"))
    meta = fit_distributed_pca(list(ok["canon_uri"]), list(ok["model_id"]), WeightLayout.from_arch(
        ArchSpec.parse(cfg.zoo.arch)), cfg.pca, run_store.stage_uri("pca"))
    print(f"pca: {meta['side']} side, n={meta['n']} models, d={meta['d']:,}: k={meta['k']} components keep "
          f"{meta['explained_variance_total']:.2%} of the variance", flush=True)
    return {"n": meta["n"], "d": meta["d"], "k": meta["k"], "side": meta["side"],
            "explained_variance_total": meta["explained_variance_total"]}
