"""How strongly a weight-space difference excites a model's layers on real inputs, against isotropic noise.

For a Linear or Conv2d layer with inputs u (conv: unfolded patches) and second-moment matrix C = E[u u^T], a
weight change D changes the layer's outputs by D u, of mean energy tr(D C D^T). Isotropic noise of the same
norm gives |D|^2 tr(C) / m on average (m: the input size). Their ratio says whether a difference between two
models lies in the directions the data excites (> 1) or in directions it barely reaches (< 1), where it
costs accuracy as little as noise does. Layers whose forward never runs as a module (the packed attention
projection of ``nn.MultiheadAttention``) are not covered.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dwf_ray.archs import ArchSpec
from dwf_ray.weights import to_module


def input_moments(arch: ArchSpec, state: dict[str, np.ndarray], x: torch.Tensor) -> dict[str, np.ndarray]:
    """{layer name: E[u u^T]} of the inputs u of every Linear and Conv2d layer of the model on inputs ``x``."""
    model = to_module(arch, state).eval()
    moments: dict[str, np.ndarray] = {}

    def hook(name: str):
        def keep(mod, inp, _out):
            u = inp[0].detach().double()
            if isinstance(mod, nn.Conv2d):
                u = F.unfold(u, mod.kernel_size, dilation=mod.dilation, padding=mod.padding, stride=mod.stride)
                u = u.transpose(1, 2)
            u = u.reshape(-1, u.shape[-1])
            moments[name] = (u.T @ u / len(u)).numpy()
        return keep

    hooks = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return moments


def excitation_ratio(moments: dict[str, np.ndarray], a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """Output energy of the change ``b - a`` over that of isotropic noise with the same norm in each layer,
    summed over the layers in ``moments`` (1.0: as harmless to the data as noise; more: more exciting)."""
    signal = noise = 0.0
    for name, c in moments.items():
        w = f"{name}.weight"
        d = (np.asarray(b[w], np.float64) - np.asarray(a[w], np.float64)).reshape(len(b[w]), -1)
        signal += float(np.einsum("oi,ij,oj->", d, c, d))
        noise += float((d ** 2).sum() * np.trace(c) / c.shape[0])
    return signal / noise if noise > 0 else float("nan")
