"""The small CNNs of the public Model Zoos (Schürholt et al., NeurIPS 2022): ``mz-cnn`` (their ``CNN``, 28x28
inputs) and ``mz-cnn3`` (their ``CNN3``, 32x32 inputs), with the authors' tensor names.

Every layer sits in one ``nn.ModuleList`` named ``module_list`` (keys ``module_list.<i>.weight``). ``CNN`` gives a
Dropout layer an index only when dropout > 0, so the same weights carry different key indices across one
hyper-parameter zoo (0, 3, 6, 9, 11 without dropout; 0, 4, 8, 11, 14 with it); ``CNN3`` always has its Dropout
layers. :func:`from_module_list` reads a checkpoint's layers from the keys it holds, in index order.
"""
from __future__ import annotations

import re

import torch.nn as nn

from dwf_ray.archs import ArchSpec, register
from dwf_ray.archs.cnn import build_on_meta, module_axes
from dwf_ray.archs.perm_spec import PermutationSpec

ACTIVATIONS = {"leakyrelu": nn.LeakyReLU, "relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
               "silu": nn.SiLU, "gelu": nn.GELU}
# (out channels, kernel, 2x2 max-pool after it) of each conv layer
CNN_CONVS = ((8, 5, True), (6, 5, True), (4, 2, False))
CNN3_CONVS = ((16, 3, True), (32, 3, True), (15, 3, True))


class ModelZooCNN(nn.Module):
    """Conv blocks (conv, [pool], activation, [dropout]), flatten, Linear-activation-[dropout], Linear head.

    ``dropout_layers``: "if_positive" (``CNN``: Dropout modules only when dropout > 0) or "always" (``CNN3``).
    """

    def __init__(self, convs, in_channels: int, image_size: int, activation: str, dropout: float,
                 dropout_layers: str, hidden: int = 20, n_classes: int = 10):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"model zoo CNN: activation {activation!r} is not one of {', '.join(ACTIVATIONS)}")
        with_dropout = dropout_layers == "always" or dropout > 0
        layers, c_in, size = [], in_channels, image_size
        for c_out, kernel, pool in convs:
            layers.append(nn.Conv2d(c_in, c_out, kernel))
            size = size - kernel + 1
            if pool:
                layers.append(nn.MaxPool2d(2, 2))
                size //= 2
            layers.append(ACTIVATIONS[activation]())
            if with_dropout and (pool or dropout_layers == "always"):
                layers.append(nn.Dropout(dropout))
            c_in = c_out
        if size < 1:
            raise ValueError(f"model zoo CNN: images of {image_size}x{image_size} are too small for its layers")
        layers += [nn.Flatten(), nn.Linear(c_in * size * size, hidden), ACTIVATIONS[activation]()]
        if with_dropout:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(hidden, n_classes))
        self.module_list = nn.ModuleList(layers)

    def forward(self, x):
        for layer in self.module_list:
            x = layer(x)
        return x


def mz_cnn(in_channels: int = 1, activation: str = "leakyrelu", dropout: float = 0.0, image_size: int = 28,
           n_classes: int = 10) -> ModelZooCNN:
    """The authors' ``CNN``: 2,464 parameters for one input channel, 2,864 for three."""
    return ModelZooCNN(CNN_CONVS, in_channels, image_size, activation, dropout, "if_positive", n_classes=n_classes)


def mz_cnn3(in_channels: int = 3, activation: str = "leakyrelu", dropout: float = 0.0, image_size: int = 32,
            n_classes: int = 10) -> ModelZooCNN:
    """The authors' ``CNN3``: 10,853 parameters for three input channels."""
    return ModelZooCNN(CNN3_CONVS, in_channels, image_size, activation, dropout, "always", n_classes=n_classes)


def weighted_layers(model: nn.Module) -> list[str]:
    """Names (``module_list.<i>``) of the Conv2d and Linear layers, in order."""
    return [f"module_list.{i}" for i, m in enumerate(model.module_list) if isinstance(m, (nn.Conv2d, nn.Linear))]


_KEY = re.compile(r"module_list\.(\d+)\.(weight|bias)")


def from_module_list(state: dict, arch: ArchSpec, where: str) -> dict:
    """``state`` (keys ``module_list.<i>.weight/bias`` at whatever indices its checkpoint used) renamed onto the
    layers of ``arch``: the k-th layer present becomes the k-th Conv/Linear layer of ``arch``. A checkpoint with
    another number of layers, a layer without its bias, or other keys is a ValueError naming ``where``."""
    found: dict[int, dict[str, object]] = {}
    for key, value in state.items():
        match = _KEY.fullmatch(key)
        if not match:
            raise ValueError(f"{where}: key {key!r} is not a module_list.<i>.weight/bias tensor")
        found.setdefault(int(match[1]), {})[match[2]] = value
    targets = weighted_layers(build_on_meta(arch))
    if len(found) != len(targets) or any(set(t) != {"weight", "bias"} for t in found.values()):
        raise ValueError(f"{where}: layers at module_list indices {sorted(found)} with tensors "
                         f"{[sorted(found[i]) for i in sorted(found)]}; {arch.family} has {len(targets)} layers "
                         f"with a weight and a bias each")
    return {f"{name}.{t}": found[i][t] for name, i in zip(targets, sorted(found)) for t in ("weight", "bias")}


def mz_permutation_spec(spec: ArchSpec) -> PermutationSpec:
    """Each conv layer's output channels feed the next conv through their own permutation, and the hidden units
    of the first Linear layer have one. The last conv layer's channels stay in place: the flatten interleaves them
    with the spatial positions in the first Linear layer's input columns (a block permutation, not an axis one)."""
    model = build_on_meta(spec)
    layers = weighted_layers(model)
    convs = [n for n in layers if isinstance(model.get_submodule(n), nn.Conv2d)]
    axes: dict[str, tuple] = {}
    p_prev = None
    for i, name in enumerate(convs):
        p = f"P_{name}" if i < len(convs) - 1 else None
        axes |= module_axes(model, name, p, p_prev)
        p_prev = p
    hidden, head = layers[len(convs):]
    axes |= module_axes(model, hidden, f"P_{hidden}", None) | module_axes(model, head, None, f"P_{hidden}")
    return PermutationSpec(axes)


register("mz-cnn", mz_cnn, mz_permutation_spec)
register("mz-cnn3", mz_cnn3, mz_permutation_spec)
