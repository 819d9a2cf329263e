"""The probability path of flow matching: source noise, training times, minibatch OT pairing, and the
straight path x_t = (1 - t) x0 + t x1 + sigma eps with its velocity x1 - x0."""
from __future__ import annotations

import math

import torch
from scipy.optimize import linear_sum_assignment


def source_noise(kind: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Unit-variance source noise: standard normal, or uniform on [-sqrt 3, sqrt 3]."""
    if kind == "gaussian":
        return torch.randn(shape, generator=g)
    if kind == "uniform":
        return (torch.rand(shape, generator=g) * 2 - 1) * math.sqrt(3)
    raise ValueError(f"unknown source distribution {kind!r}; use 'gaussian' or 'uniform'")


def training_times(kind: str, n: int, g: torch.Generator, loc: float = 0.0, scale: float = 1.0) -> torch.Tensor:
    """Times t in (0, 1): uniform, or logit-normal sigmoid(loc + scale N(0, 1)) (more weight mid-path)."""
    if kind == "logit_normal":
        return torch.sigmoid(loc + scale * torch.randn(n, generator=g))
    if kind == "uniform":
        return torch.rand(n, generator=g)
    raise ValueError(f"unknown time distribution {kind!r}; use 'uniform' or 'logit_normal'")


def ot_pair(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """Minibatch optimal-transport coupling: reorder the source samples to match targets."""
    cost = torch.cdist(x1, x0).pow(2).numpy()
    _, cols = linear_sum_assignment(cost)
    return x0[torch.as_tensor(cols)]


def straight_path(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor, sigma: float,
                  g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, target velocity) on the straight path from x0 to x1 with path noise ``sigma``."""
    eps = torch.randn(x1.shape, generator=g)
    xt = (1 - t[:, None]) * x0 + t[:, None] * x1 + sigma * eps
    return xt, x1 - x0
