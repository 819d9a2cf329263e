"""Stage 2: canonicalize every zoo model onto the reference with Ray Data and an actor pool."""
from __future__ import annotations

import numpy as np
import pandas as pd
import ray

from dwf_ray import store
from dwf_ray.archs import ArchSpec, permutation_spec
from dwf_ray.canon.matching import canonicalize, distance
from dwf_ray.config import CanonConfig
from dwf_ray.weights import CheckpointError, load_model_state, save_checkpoint


class Canonicalizer:
    """Ray Data actor: loads the reference once, then matches each checkpoint of its batches onto it."""

    def __init__(self, ref_uri: str, arch_json: str, out_dir: str, cfg_json: str):
        import torch
        torch.set_num_threads(1)
        self.arch = ArchSpec.from_json(arch_json)
        self.cfg = CanonConfig.model_validate_json(cfg_json)
        ref, _ = load_model_state(ref_uri, self.arch)
        self.spec = permutation_spec(self.arch)
        from dwf_ray.weights import WeightLayout
        self.param_names = WeightLayout.from_arch(self.arch).names
        self.ref = {k: ref[k] for k in self.param_names}
        self.out_dir = out_dir

    def one(self, row: dict) -> dict:
        if row["status"] != "ok":
            return {"canon_uri": "", "dist_before": np.nan, "dist_after": np.nan}
        state, _ = load_model_state(row["uri"], self.arch)
        if self.cfg.enabled:
            out, _ = canonicalize(self.spec, self.ref, state, self.cfg.max_iter, self.cfg.seed)
        else:
            out = state
        uri = store.join(self.out_dir, f"{row['model_id']}.safetensors")
        save_checkpoint(uri, out, self.arch, extra={"source": row["uri"]})
        return {"canon_uri": uri, "dist_before": distance(self.ref, state, self.param_names),
                "dist_after": distance(self.ref, out, self.param_names)}

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        results = []
        for row in batch.to_dict("records"):
            try:
                results.append(self.one(row))
            except CheckpointError as exc:
                results.append({"canon_uri": "", "dist_before": np.nan, "dist_after": np.nan,
                                "status": "error", "error": str(exc)})
        res = pd.DataFrame(results, index=batch.index)
        out = batch.copy()
        for col in ("canon_uri", "dist_before", "dist_after"):
            out[col] = res[col]
        if "status" in res:
            failed = res["status"].notna()
            out.loc[failed, "status"] = "error"
            out.loc[failed, "error"] = res.loc[failed, "error"]
        return out


def run_canon(manifest: pd.DataFrame, cfg: CanonConfig, out_dir: str) -> pd.DataFrame:
    """One output row per input row (failed inputs keep their status and error)."""
    ok = manifest[manifest["status"] == "ok"].sort_values("model_id")
    if ok.empty:
        raise ValueError("canonicalize: no usable models in the zoo manifest")
    if cfg.reference >= len(ok):
        raise ValueError(f"canonicalize: reference index {cfg.reference} but only {len(ok)} usable models")
    ref_row = ok.iloc[cfg.reference]
    arch_json = ref_row["arch"]
    try:
        load_model_state(ref_row["uri"], ArchSpec.from_json(arch_json))
    except CheckpointError as exc:
        raise ValueError(f"canonicalize: the reference model is unusable: {exc}") from exc
    cols = [c for c in ("model_id", "uri", "status", "error") if c in manifest]
    ds = ray.data.from_pandas(manifest[cols].astype({"status": str, "error": str}))
    ds = ds.map_batches(
        Canonicalizer,
        fn_constructor_kwargs=dict(ref_uri=ref_row["uri"], arch_json=arch_json, out_dir=out_dir,
                                   cfg_json=cfg.model_dump_json()),
        batch_size=cfg.batch_size, batch_format="pandas",
        compute=ray.data.ActorPoolStrategy(min_size=cfg.min_actors, max_size=cfg.max_actors),
        num_cpus=cfg.actor_cpus, num_gpus=cfg.actor_gpus or None,
    )
    out = ds.to_pandas()
    merged = manifest.drop(columns=["status", "error"]).merge(out[["model_id", "canon_uri", "dist_before",
                                                                  "dist_after", "status", "error"]],
                                                             on="model_id", how="left")
    merged["reference_id"] = ref_row["model_id"]
    if len(merged) != len(manifest):
        raise RuntimeError(f"canonicalize: {len(manifest)} rows in, {len(merged)} rows out")
    return merged.sort_values("model_id").reset_index(drop=True)
