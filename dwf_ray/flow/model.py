"""The velocity network v(x_t, t): an MLP with a time embedding, LayerNorm, GELU, dropout."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from dwf_ray.config import FlowConfig


class TimeEmbedding(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / max(half - 1, 1))
        ang = t.reshape(-1, 1) * 1000.0 * freqs
        return self.mlp(torch.cat([ang.sin(), ang.cos()], dim=1))


class VelocityMLP(nn.Module):
    """v(x_t, t[, y]). Zero-initialised last layer, so training starts from v = 0.

    With ``n_classes`` > 0 a class label conditions the velocity: its embedding is added to the time embedding
    and it selects its own output head; label ``n_classes`` (also used when ``y`` is None) is the null label of
    classifier-free guidance. The heads matter when the classes' latents share their mean and covariance (zoos
    whitened each on their own): with the embedding alone the flow learned to ignore the label.
    """

    def __init__(self, dim: int, hidden: int = 512, depth: int = 3, time_dim: int = 64, dropout: float = 0.1,
                 n_classes: int = 0):
        super().__init__()
        self.n_classes = n_classes
        self.time = TimeEmbedding(time_dim)
        if n_classes:
            self.label = nn.Embedding(n_classes + 1, time_dim)
            nn.init.zeros_(self.label.weight)      # starts as the unconditional model
        layers: list[nn.Module] = []
        width = dim + time_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Dropout(dropout)]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.dim = dim
        self.out = nn.Linear(width, dim * (n_classes + 1 if n_classes else 1))
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        t = t.expand(len(x)) if t.dim() == 0 else t
        if not self.n_classes:
            if y is not None:
                raise ValueError("this velocity network is unconditional (n_classes=0) but got labels")
            return self.out(self.body(torch.cat([x, self.time(t)], dim=1)))
        if y is None:
            y = torch.full((len(x),), self.n_classes, dtype=torch.long, device=x.device)
        heads = self.out(self.body(torch.cat([x, self.time(t) + self.label(y)], dim=1)))
        return heads.view(len(x), self.n_classes + 1, self.dim)[torch.arange(len(x), device=x.device), y]


def build_velocity_net(cfg: FlowConfig, dim: int, n_classes: int = 0) -> VelocityMLP:
    return VelocityMLP(dim, cfg.hidden, cfg.depth, cfg.time_dim, cfg.dropout, n_classes)
