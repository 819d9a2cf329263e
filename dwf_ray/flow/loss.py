"""The flow-matching loss: mean squared error between the velocity net's output at (x_t, t) and the path's
target velocity dx_t."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dwf_ray.flow.path import PathSample


def flow_matching_loss(velocity: torch.nn.Module, sample: PathSample, device: torch.device | str,
                       y: torch.Tensor | None = None) -> torch.Tensor:
    """MSE of ``velocity(x_t, t[, y])`` against dx_t, computed on ``device`` (labels ``y`` already there)."""
    return F.mse_loss(velocity(sample.x_t.to(device), sample.t.to(device), y), sample.dx_t.to(device))
