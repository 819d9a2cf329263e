"""The probability path of flow matching: the straight path x_t = (1 - t) x_0 + t x_1 + sigma eps with its
velocity x_1 - x_0, as an object (``StraightPath``) that owns the source distribution and scale, the training
times, minibatch OT pairing and sigma, and returns a typed ``PathSample``."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from scipy.optimize import linear_sum_assignment

from dwf_ray.config import FlowConfig


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


@dataclass(frozen=True)
class PathSample:
    """Points x_t on the path at times t between source x_0 and data x_1, and the target velocity dx_t."""
    x_t: torch.Tensor
    dx_t: torch.Tensor
    x_0: torch.Tensor
    x_1: torch.Tensor
    t: torch.Tensor


@dataclass(frozen=True)
class StraightPath:
    """x_t = (1 - t) x_0 + t x_1 + sigma eps, dx_t = x_1 - x_0. Owns the source (``source`` kind scaled by
    ``source_std``), the training times, minibatch OT pairing (``ot``) and the path noise ``sigma``."""
    source_kind: str = "gaussian"
    source_std: float = 1.0
    sigma: float = 0.0
    ot: bool = False
    time_dist: str = "uniform"
    time_loc: float = 0.0
    time_scale: float = 1.0

    @classmethod
    def from_config(cls, cfg: FlowConfig) -> "StraightPath":
        return cls(cfg.source, cfg.source_std, cfg.sigma, cfg.ot_coupling, cfg.time_dist, cfg.time_loc,
                   cfg.time_scale)

    def without_ot(self) -> "StraightPath":
        return replace(self, ot=False)

    def source(self, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
        """Source samples x_0: the unit-variance source noise times ``source_std``."""
        return source_noise(self.source_kind, shape, g) * self.source_std

    def sample(self, x_0: torch.Tensor, x_1: torch.Tensor, t: torch.Tensor, g: torch.Generator) -> PathSample:
        """The path at times ``t`` (one per row), with fresh path noise."""
        eps = torch.randn(x_1.shape, generator=g)
        x_t = (1 - t[:, None]) * x_0 + t[:, None] * x_1 + self.sigma * eps
        return PathSample(x_t, x_1 - x_0, x_0, x_1, t)

    def sample_for(self, x_1: torch.Tensor, g: torch.Generator) -> PathSample:
        """A training batch for data ``x_1``: fresh source samples (OT-paired to ``x_1`` when ``ot``), times and
        path noise, drawn from ``g`` in that order."""
        x_0 = self.source(x_1.shape, g)
        if self.ot:
            x_0 = ot_pair(x_0, x_1)
        t = training_times(self.time_dist, len(x_1), g, self.time_loc, self.time_scale)
        return self.sample(x_0, x_1, t, g)
