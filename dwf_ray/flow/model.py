"""The velocity network v(x_t, t): an MLP with a time embedding, LayerNorm, GELU, dropout."""
from __future__ import annotations

import math

import torch
import torch.nn as nn


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
    """Zero-initialised last layer, so training starts from v = 0."""

    def __init__(self, dim: int, hidden: int = 512, depth: int = 3, time_dim: int = 64, dropout: float = 0.1):
        super().__init__()
        self.time = TimeEmbedding(time_dim)
        layers: list[nn.Module] = []
        width = dim + time_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Dropout(dropout)]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(width, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.expand(len(x)) if t.dim() == 0 else t
        return self.out(self.body(torch.cat([x, self.time(t)], dim=1)))
