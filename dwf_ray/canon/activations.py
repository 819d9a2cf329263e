"""Activation matching (Git Re-Basin's other method) for models without attention: MLP, CNN, ResNet.

Each permutation of the spec is solved once, by one linear assignment on the correlation between the
reference's units and the other model's units on the same training inputs. A permutation's units are the
output channels of every module whose weight it permutes on axis 0 (a ResNet stream: the stem and each
block's second conv and BatchNorm, and the downsample shortcut), pooled over inputs and spatial positions.

Weight matching compares weights; where the weights still carry most of their random initialisation
(narrow, deep BatchNorm networks) it finds little to align, and activation matching, which compares what
the units compute, aligns far better (docs/results-families.md).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
from scipy.optimize import linear_sum_assignment

from dwf_ray.archs import ArchSpec, permutation_spec
from dwf_ray.archs.perm_spec import PermutationSpec, apply_permutation
from dwf_ray.weights import to_module

_UNIT_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d)


def _standardized(out: torch.Tensor, channel_last: bool) -> np.ndarray:
    """(channels, samples) float32, each channel centred and scaled to unit norm (constant channels: zero)."""
    a = out.detach().double()
    a = a.reshape(-1, a.shape[-1]).T if channel_last else a.transpose(0, 1).reshape(a.shape[1], -1)
    a = a - a.mean(1, keepdim=True)
    return (a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)).float().numpy()


def check_supported(arch: ArchSpec) -> PermutationSpec:
    """The architecture's PermutationSpec; a ValueError for attention models (TransFusion handles those)."""
    spec = permutation_spec(arch)
    if spec.attention:
        raise ValueError(f"activation matching: {arch.family!r} has attention blocks; use canon.method=weights "
                         "(TransFusion)")
    return spec


class ActivationMatcher:
    """Permutes models onto one reference by the correlation of their units on fixed training inputs ``x``."""

    def __init__(self, arch: ArchSpec, ref: dict[str, np.ndarray], x: torch.Tensor):
        self.arch, self.spec, self.x = arch, check_supported(arch), x
        self.ref = self.unit_activations(ref)
        missing = sorted(set(self.spec.free(self.spec.sizes(ref))) - set(self.ref))
        if missing:
            raise ValueError(f"activation matching: no module output carries permutation(s) {missing} "
                             f"of {arch.family!r}")

    def unit_activations(self, state: dict[str, np.ndarray]) -> dict[str, list[np.ndarray]]:
        """{permutation: standardized (units, samples) outputs of every module whose output channels it permutes}."""
        model = to_module(self.arch, state).eval()
        acts: dict[str, list[np.ndarray]] = {}
        hooks = []
        for name, module in model.named_modules():
            perms = self.spec.axes.get(f"{name}.weight")
            if isinstance(module, _UNIT_MODULES) and perms and perms[0] is not None:
                def keep(_m, _i, out, p=perms[0], last=isinstance(module, nn.Linear)):
                    acts.setdefault(p, []).append(_standardized(out, last))
                hooks.append(module.register_forward_hook(keep))
        try:
            with torch.no_grad():
                model(self.x)
        finally:
            for h in hooks:
                h.remove()
        return acts

    def permutations(self, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        acts = self.unit_activations(state)
        return {p: linear_sum_assignment(sum(r @ o.T for r, o in zip(refs, acts[p])), maximize=True)[1]
                for p, refs in self.ref.items()}

    def __call__(self, state: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(permuted state, permutations), as :func:`dwf_ray.canon.matching.canonicalize`."""
        perm = self.permutations(state)
        return apply_permutation(self.spec, perm, state), perm
