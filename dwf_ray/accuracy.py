"""Predictions, accuracy and BatchNorm recalibration on the training split."""
from __future__ import annotations

import torch
import torch.nn as nn

from dwf_ray.data import Split


@torch.no_grad()
def predict(model: nn.Module, split: Split, batch_size: int = 1024) -> torch.Tensor:
    model.eval()
    return torch.cat([model(split.x[i:i + batch_size]).argmax(1) for i in range(0, len(split), batch_size)])


def accuracy(model: nn.Module, split: Split) -> float:
    return float((predict(model, split) == split.y).float().mean())


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, train: Split, batches: int = 20, batch_size: int = 128,
                          seed: int = 0) -> nn.Module:
    """Re-estimate BatchNorm running statistics on the training split (never on test data).

    The statistics are a cumulative average over the calibration batches; each layer's momentum is
    restored afterwards, so the model trains as usual if it is fine-tuned later.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return model
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    g = torch.Generator().manual_seed(seed)
    for _ in range(batches):
        idx = torch.randint(len(train), (min(batch_size, len(train)),), generator=g)
        model(train.x[idx])
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    return model.eval()
