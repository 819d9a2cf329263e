"""The sample stage: new models from the trained flow, written as checkpoints.

``samples/`` holds the models at the configured temperature; ``samples/T<t>/`` one set per other temperature
of the evaluation's sweep (``eval.temperatures``), each with its manifest. Only this stage writes samples.
"""
from __future__ import annotations

import numpy as np
import ray

from dwf_ray.config import RunConfig
from dwf_ray.store import RunStore


def sample_sets(cfg: RunConfig) -> dict[str, tuple[float, int]]:
    """Sub-folder of samples/ -> (temperature, seed): "" for the configured temperature, then the sweep."""
    sampling = cfg.sample
    sweep = [t for t in cfg.eval.temperatures if not np.isclose(t, sampling.temperature)]
    return {"": (sampling.temperature, sampling.seed)} | {f"T{t:g}": (t, sampling.seed + 1 + i)
                                                          for i, t in enumerate(sweep)}


def _generate_all(root: str, cfg_json: str) -> dict[str, int]:
    """Ray task: load the Generator once and write every set of samples."""
    from dwf_ray.runtime import task_device
    from dwf_ray.sample.generator import Generator
    cfg, run_store = RunConfig.model_validate_json(cfg_json), RunStore(root)
    gen, sampling = Generator.load(run_store.root, device=task_device()), cfg.sample
    return {folder: len(gen.write(run_store.uri("samples", folder),
                                  gen(sampling.n, temp, seed, sampling.solver, sampling.steps)))
            for folder, (temp, seed) in sample_sets(cfg).items()}


def run_sample(cfg: RunConfig, run_store: RunStore) -> dict:
    """The sample stage, in one Ray task (on a GPU when the flow trained on one)."""
    gpus = 1 if cfg.flow.resolved_use_gpu() else 0
    written = ray.get(ray.remote(_generate_all).options(num_gpus=gpus).remote(run_store.root, cfg.model_dump_json()))
    return {"n": written[""], "sets": {k or "main": v for k, v in written.items()}}
