"""1-D CNN for signals (MNIST-1D's ``ConvBase``): strided Conv1d + ReLU layers, then a Conv1d head that spans the
whole remaining length, which is the flatten + Linear of the original written so that its weight keeps its channel
axis (10 x C x L) and a permutation of the last channels acts on it directly."""
from __future__ import annotations

import torch.nn as nn

from dwf_ray.archs import ArchSpec, register
from dwf_ray.archs.cnn import build_on_meta, module_axes
from dwf_ray.archs.perm_spec import PermutationSpec


def conv_length(length: int, kernel: int, stride: int, padding: int) -> int:
    return (length + 2 * padding - kernel) // stride + 1


class CNN1d(nn.Module):
    """Tensor names: ``convs.{i}`` (Conv1d), ``head`` (Conv1d over the last feature map's whole length)."""

    def __init__(self, in_length: int = 40, channels: list[int] = (25, 25, 25), kernels: list[int] = (5, 3, 3),
                 strides: list[int] = (2, 2, 2), padding: int = 1, n_classes: int = 10):
        super().__init__()
        if not channels or min(channels) < 1 or not len(channels) == len(kernels) == len(strides):
            raise ValueError(f"cnn1d: channels, kernels and strides must be equally long lists of positive sizes, "
                             f"got {channels!r}, {kernels!r}, {strides!r}")
        layers, c_in, length = [], 1, in_length
        for c, k, s in zip(channels, kernels, strides):
            layers.append(nn.Conv1d(c_in, c, k, stride=s, padding=padding))
            c_in, length = c, conv_length(length, k, s, padding)
            if length < 1:
                raise ValueError(f"cnn1d: a signal of length {in_length} is too short for these layers")
        self.convs = nn.ModuleList(layers)
        self.head = nn.Conv1d(c_in, n_classes, length)

    def forward(self, x):
        h = x.reshape(x.shape[0], 1, -1)
        for conv in self.convs:
            h = conv(h).relu()
        return self.head(h).flatten(1)


def cnn1d_permutation_spec(spec: ArchSpec) -> PermutationSpec:
    """Each conv layer's output channels get their own permutation: its rows and the next layer's input."""
    model = build_on_meta(spec)
    axes: dict[str, tuple] = {}
    p_prev = None
    for i in range(len(model.convs)):
        axes |= module_axes(model, f"convs.{i}", f"P_convs.{i}", p_prev)
        p_prev = f"P_convs.{i}"
    axes |= module_axes(model, "head", None, p_prev)
    return PermutationSpec(axes)


register("cnn1d", CNN1d, cnn1d_permutation_spec)
