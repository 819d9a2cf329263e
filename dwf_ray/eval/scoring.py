"""Test accuracy and misclassification masks of many flat weight vectors, as Ray tasks."""
from __future__ import annotations

import numpy as np
import ray
import torch

from dwf_ray.archs import ArchSpec
from dwf_ray.config import EvalConfig, ZooConfig
from dwf_ray.data import Split, dataset_for
from dwf_ray.eval.accuracy import predict, recalibrate_batchnorm
from dwf_ray.weights import WeightLayout, to_module


def task_device() -> str:
    """"cuda" inside a Ray task or actor that was given a GPU, else "cpu"."""
    return "cuda" if ray.is_initialized() and ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"


def score_flat(arch_json: str, zoo_json: str, eval_json: str, flat: np.ndarray, val_logits: int = 256):
    """(test accuracy, wrong-prediction mask, logits on the first ``val_logits`` validation examples) per model.

    BatchNorm is recalibrated on train data. The logits are a permutation-invariant fingerprint of a model.
    Inputs may be features, images or token ids; runs on the task's GPU when it has one.
    """
    torch.set_num_threads(1)
    arch = ArchSpec.from_json(arch_json)
    zc, ec = ZooConfig.model_validate_json(zoo_json), EvalConfig.model_validate_json(eval_json)
    data, dev = dataset_for(zc), task_device()
    train, test = (Split(s.x.to(dev), s.y.to(dev)) for s in (data.train, data.test))
    val_x = data.val.x[:val_logits].to(dev)
    layout = WeightLayout.from_arch(arch)
    accs, wrong, logits = [], [], []
    for vec in flat:
        model = to_module(arch, layout.unflatten(vec)).to(dev)
        recalibrate_batchnorm(model, train, ec.bn_recal_batches, seed=ec.seed)
        miss = (predict(model, test) != test.y).cpu().numpy()
        accs.append(1.0 - miss.mean())
        wrong.append(miss)
        with torch.no_grad():
            logits.append(model(val_x).cpu().numpy())
    return np.asarray(accs), np.asarray(wrong), np.asarray(logits)


def map_chunks(fn, sets: dict[str, tuple[tuple, tuple]], desc: str, chunk: int = 64, num_gpus: float = 0.0,
               **kwargs) -> dict[str, tuple]:
    """Ray tasks ``fn(*shared, *rows, **kwargs)`` over chunks of several named sets; outputs concatenated per set.

    ``sets[name] = (shared arguments, arrays with one row per model)``; only the latter are chunked.
    ``num_gpus``: GPUs given to each task.
    """
    from dwf_ray.runtime import wait_with_progress
    remote = ray.remote(fn).options(num_gpus=num_gpus)
    jobs, refs = [], []
    for name, (shared, rows) in sets.items():
        for i in range(0, len(rows[0]), chunk):
            jobs.append(name)
            refs.append(remote.remote(*shared, *(r[i:i + chunk] for r in rows), **kwargs))
    results = wait_with_progress(refs, desc)
    out: dict[str, list] = {name: [] for name in sets}
    for name, res in zip(jobs, results):
        out[name].append(res)
    return {name: tuple(np.concatenate(col) for col in zip(*parts)) for name, parts in out.items()}


def score_many(arch: ArchSpec, zoo_cfg: ZooConfig, eval_cfg: EvalConfig, sets: dict[str, np.ndarray],
               val_logits: int = 256) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(accuracy, wrong masks, validation logits) of several named sets of models, in parallel Ray tasks."""
    args = (arch.to_json(), zoo_cfg.model_dump_json(), eval_cfg.model_dump_json())
    return map_chunks(score_flat, {name: (args, (flat,)) for name, flat in sets.items()}, "eval: scoring models",
                      num_gpus=eval_cfg.num_gpus, val_logits=val_logits)
