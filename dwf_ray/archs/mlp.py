"""Multi-layer perceptron of any depth and width."""
from __future__ import annotations

import torch.nn as nn

from dwf_ray.archs import ArchSpec, register
from dwf_ray.archs.perm_spec import PermutationSpec


class MLP(nn.Module):
    def __init__(self, in_dim: int, hidden: list[int], out_dim: int, activation: str = "relu"):
        super().__init__()
        act = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}[activation]
        layers: list[nn.Module] = []
        dims = [in_dim, *hidden]
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), act()]
        layers.append(nn.Linear(dims[-1], out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x.flatten(1))


def linear_chain_spec(names: list[str], prefix: str = "P") -> PermutationSpec:
    """Hidden units between consecutive Linear layers ``names[i]`` and ``names[i+1]`` share permutation i."""
    axes: dict[str, tuple] = {}
    for i, name in enumerate(names):
        p_out = f"{prefix}{i}" if i < len(names) - 1 else None
        p_in = f"{prefix}{i - 1}" if i > 0 else None
        axes[f"{name}.weight"] = (p_out, p_in)
        axes[f"{name}.bias"] = (p_out,)
    return PermutationSpec(axes)


def mlp_permutation_spec(spec: ArchSpec) -> PermutationSpec:
    n_linear = len(spec.args["hidden"]) + 1
    return linear_chain_spec([f"net.{2 * i}" for i in range(n_linear)])


register("mlp", MLP, mlp_permutation_spec)
