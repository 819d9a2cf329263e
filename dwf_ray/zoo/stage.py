"""The zoo stage: train ``zoo.n_models`` models, or import checkpoints or a Model Zoo trained elsewhere; writes
zoo/ and its manifest."""
from __future__ import annotations

from dwf_ray import store
from dwf_ray.archs import ArchSpec
from dwf_ray.config import RunConfig
from dwf_ray.store import RunStore
from dwf_ray.zoo import check_arch_fits_data, import_checkpoints, train_zoo
from dwf_ray.zoo.modelzoo import import_model_zoo


def run_zoo(cfg: RunConfig, run_store: RunStore) -> dict:
    """The zoo stage: train ``cfg.zoo.n_models`` models; writes zoo/ and its manifest."""
    check_arch_fits_data(ArchSpec.parse(cfg.zoo.arch), cfg.zoo)
    manifest = train_zoo(cfg.zoo, run_store.stage_uri("zoo"))
    store.write_table(run_store.stage_uri("zoo", "manifest.parquet"), manifest)
    return store.counts(manifest) | {"test_acc_mean": float(manifest["test_acc"].mean())}


def run_import(cfg: RunConfig, run_store: RunStore, source: str) -> dict:
    """The zoo stage for checkpoints trained elsewhere: every model under ``source`` gets a manifest row."""
    manifest = import_checkpoints(source, ArchSpec.parse(cfg.zoo.arch), cfg.zoo.dataset, run_store.stage_uri("zoo"))
    store.write_table(run_store.stage_uri("zoo", "manifest.parquet"), manifest)
    return store.counts(manifest) | {"source": source}


def run_modelzoo_import(cfg: RunConfig, run_store: RunStore, source: str, epoch: int | None, max_abs_weight: float | None) -> dict:
    """The zoo stage for a Model Zoo folder: every model folder under ``source`` gets a manifest row."""
    manifest = import_model_zoo(source, ArchSpec.parse(cfg.zoo.arch), cfg.zoo.dataset, run_store.stage_uri("zoo"), epoch,
                           max_abs_weight)
    store.write_table(run_store.stage_uri("zoo", "manifest.parquet"), manifest)
    return store.counts(manifest) | {"source": source, "epoch": int(manifest["epoch"].iloc[0]),
                                "max_abs_weight": max_abs_weight}
