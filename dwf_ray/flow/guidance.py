"""Classifier-free guidance, in one place: training drops labels to the null label (``n_classes``) with
probability ``p_uncond``; sampling mixes the conditional and unconditional velocities,
v = v_uncond + w (v_cond - v_uncond)."""
from __future__ import annotations

import torch


def drop_labels(y: torch.Tensor, p_uncond: float, null_label: int, g: torch.Generator) -> torch.Tensor:
    """Each label replaced by ``null_label`` with probability ``p_uncond`` (one draw from ``g`` per label)."""
    return torch.where(torch.rand(len(y), generator=g) < p_uncond, null_label, y)


def guided_velocity(net: torch.nn.Module, label: int | None, guidance: float):
    """f(t, x) for the ODE solver. With a label (conditional flow): v_uncond + w (v_cond - v_uncond);
    w = 1 is the plain conditional flow, w = 0 the unconditional one. The label is checked by the caller
    (``Generator.check_request``)."""
    if label is None:
        return lambda t, x: net(x, t)

    def f(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        n = len(x)
        y = torch.full((n,), label, dtype=torch.long, device=x.device)
        if guidance == 1.0:
            return net(x, t, y)
        null = torch.full((n,), net.n_classes, dtype=torch.long, device=x.device)
        v = net(torch.cat([x, x]), t.expand(2 * n) if t.dim() == 0 else torch.cat([t, t]), torch.cat([y, null]))
        v_cond, v_uncond = v[:n], v[n:]
        return v_uncond + guidance * (v_cond - v_uncond)
    return f
