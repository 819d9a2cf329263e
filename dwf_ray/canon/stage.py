"""The canon stage: every row of the zoo manifest canonicalized into canonical/, one output row each."""
from __future__ import annotations

from dwf_ray import store
from dwf_ray.canon.job import canonicalize_manifest
from dwf_ray.config import RunConfig
from dwf_ray.store import RunStore


def run_canon(cfg: RunConfig, run_store: RunStore) -> dict:
    """The canon stage: every row of the zoo manifest into canonical/, one output row each."""
    zoo_manifest = run_store.manifest("zoo")
    manifest = canonicalize_manifest(zoo_manifest, cfg.canon, run_store.stage_uri("canon"), cfg.zoo)
    store.write_table(run_store.stage_uri("canon", "manifest.parquet"), manifest)
    ok = manifest[manifest["status"] == "ok"]
    info = store.counts(manifest) | {"rows_in": len(zoo_manifest), "enabled": cfg.canon.enabled,
                                "dist_before_mean": float(ok["dist_before"].mean()),
                                "dist_after_mean": float(ok["dist_after"].mean())}
    return info
