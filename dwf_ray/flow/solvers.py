"""ODE solvers for sampling: fixed-step euler, midpoint, rk4 and adaptive dopri5 (torchdiffeq); their names are
``config.SOLVERS``."""
from __future__ import annotations

from typing import Callable

import torch
from torchdiffeq import odeint

from dwf_ray.config import FIXED_STEP_SOLVERS, SOLVERS


def integrate(f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x0: torch.Tensor, method: str = "rk4",
              steps: int = 100, t0: float = 0.0, t1: float = 1.0, rtol: float = 1e-5, atol: float = 1e-6) -> torch.Tensor:
    """x(t1) for dx/dt = f(t, x), x(t0) = x0."""
    ts = torch.tensor([t0, t1], dtype=x0.dtype, device=x0.device)
    if method in FIXED_STEP_SOLVERS:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        return odeint(f, x0, ts, method=method, options={"step_size": (t1 - t0) / steps})[-1]
    if method == "dopri5":
        return odeint(f, x0, ts, method="dopri5", rtol=rtol, atol=atol)[-1]
    raise ValueError(f"unknown solver {method!r}; use one of {SOLVERS}")
