"""Test accuracy, predictions and misclassification masks of many flat weight vectors, as Ray tasks."""
from __future__ import annotations

import numpy as np
import torch

from dwf_ray.archs import ArchSpec, build_model
from dwf_ray.config import EvalConfig, ZooConfig
from dwf_ray.accuracy import predict, recalibrate_batchnorm
from dwf_ray.data import Split, dataset_for
from dwf_ray.runtime import task_device
from dwf_ray.weights import WeightLayout, state_to_torch


def score_flat(arch_json: str, zoo_json: str, eval_json: str, flat: np.ndarray, val_logits: int = 256):
    """(test accuracy, wrong-prediction mask, logits on the first ``val_logits`` validation examples, test
    predictions) per model.

    BatchNorm is recalibrated on train data (its statistics are reset first, so nothing carries over from the
    model scored before). The logits are a permutation-invariant fingerprint of a model.
    Inputs may be features, images or token ids; runs on the task's GPU when it has one.
    """
    torch.set_num_threads(1)
    arch = ArchSpec.from_json(arch_json)
    zc, eval_cfg = ZooConfig.model_validate_json(zoo_json), EvalConfig.model_validate_json(eval_json)
    data, dev = dataset_for(zc), task_device()
    train, test = (Split(s.x.to(dev), s.y.to(dev)) for s in (data.train, data.test))
    val_x = data.val.x[:val_logits].to(dev)
    layout = WeightLayout.from_arch(arch)
    accs, wrong, logits, preds = [], [], [], []
    model = build_model(arch).to(dev)        # built once: each model's parameters are loaded into it
    for vec in flat:
        model.load_state_dict(state_to_torch(layout.unflatten(vec)), strict=False)
        recalibrate_batchnorm(model, train, eval_cfg.bn_recal_batches, seed=eval_cfg.seed)
        pred = predict(model, test)
        miss = (pred != test.y).cpu().numpy()
        accs.append(1.0 - miss.mean())
        wrong.append(miss)
        preds.append(pred.cpu().numpy().astype(np.int32))
        with torch.no_grad():
            logits.append(model(val_x).cpu().numpy())
    return np.asarray(accs), np.asarray(wrong), np.asarray(logits), np.asarray(preds)
