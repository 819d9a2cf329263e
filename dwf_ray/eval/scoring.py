"""Test accuracy and misclassification masks of many flat weight vectors, as Ray tasks."""
from __future__ import annotations

import numpy as np
import ray
import torch

from dwf_ray.archs import ArchSpec
from dwf_ray.config import EvalConfig, ZooConfig
from dwf_ray.data import load_dataset
from dwf_ray.eval.accuracy import predict, recalibrate_batchnorm
from dwf_ray.weights import WeightLayout, to_module


def score_flat(arch_json: str, zoo_json: str, eval_json: str, flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(test accuracy per model, wrong-prediction mask per model); BatchNorm recalibrated on train data."""
    torch.set_num_threads(1)
    arch = ArchSpec.from_json(arch_json)
    zc, ec = ZooConfig.model_validate_json(zoo_json), EvalConfig.model_validate_json(eval_json)
    data = load_dataset(zc.dataset, zc.split_seed, image=zc.image)
    layout = WeightLayout.from_arch(arch)
    accs, wrong = [], []
    for vec in flat:
        model = to_module(arch, layout.unflatten(vec))
        recalibrate_batchnorm(model, data.train, ec.bn_recal_batches, seed=ec.seed)
        miss = (predict(model, data.test) != data.test.y).numpy()
        accs.append(1.0 - miss.mean())
        wrong.append(miss)
    return np.asarray(accs), np.asarray(wrong)


_score_remote = ray.remote(score_flat)


def score_many(arch: ArchSpec, zoo_cfg: ZooConfig, eval_cfg: EvalConfig, sets: dict[str, np.ndarray],
               chunk: int = 64) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Score several named sets of models in parallel Ray tasks (chunks of ``chunk`` models)."""
    from dwf_ray.runtime import wait_with_progress
    args = (arch.to_json(), zoo_cfg.model_dump_json(), eval_cfg.model_dump_json())
    jobs = [(name, i) for name, flat in sets.items() for i in range(0, len(flat), chunk)]
    refs = [_score_remote.remote(*args, sets[name][i:i + chunk]) for name, i in jobs]
    results = wait_with_progress(refs, "eval: scoring models")
    out: dict[str, list] = {name: [] for name in sets}
    for (name, _), res in zip(jobs, results):
        out[name].append(res)
    return {name: (np.concatenate([a for a, _ in parts]), np.concatenate([w for _, w in parts]))
            for name, parts in out.items()}
