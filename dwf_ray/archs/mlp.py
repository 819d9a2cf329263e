"""Multi-layer perceptron of any depth and width."""
from __future__ import annotations

import torch.nn as nn

from dwf_ray.archs import ArchSpec, register
from dwf_ray.archs.perm_spec import PermutationSpec


class MLP(nn.Module):
    """Linear layers with an activation between them. With ``residual``, every hidden layer after the first
    adds its input to its output, ``h = h + act(W h + b)`` (MNIST-1D's ``MLPBase``): its hidden layers must
    then all have one width."""

    def __init__(self, in_dim: int, hidden: list[int], out_dim: int, activation: str = "relu",
                 residual: bool = False):
        super().__init__()
        if residual and len(set(hidden)) > 1:
            raise ValueError(f"mlp: residual hidden layers need one width, got {hidden}")
        act = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}[activation]
        layers: list[nn.Module] = []
        dims = [in_dim, *hidden]
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), act()]
        layers.append(nn.Linear(dims[-1], out_dim))
        self.net = nn.Sequential(*layers)
        self.residual = residual

    def forward(self, x):
        if not self.residual:
            return self.net(x.flatten(1))
        h, layers = x.flatten(1), list(self.net)
        for i in range(0, len(layers) - 1, 2):
            out = layers[i + 1](layers[i](h))
            h = h + out if i else out
        return layers[-1](h)


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
    names = [f"net.{2 * i}" for i in range(n_linear)]
    if not spec.args.get("residual"):
        return linear_chain_spec(names)
    # a residual stream: every hidden layer reads and writes the same units, so they share one permutation
    axes: dict[str, tuple] = {}
    for i, name in enumerate(names):
        p_out = "P0" if i < n_linear - 1 else None
        axes[f"{name}.weight"] = (p_out, "P0" if i else None)
        axes[f"{name}.bias"] = (p_out,)
    return PermutationSpec(axes)


register("mlp", MLP, mlp_permutation_spec)
