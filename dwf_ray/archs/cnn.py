"""Small CNN with BatchNorm for small images, and spec helpers shared by the convolutional families."""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn

from dwf_ray.archs import ArchSpec, build_model, register
from dwf_ray.archs.perm_spec import PermutationSpec


class CNN(nn.Module):
    """conv -> BatchNorm -> ReLU (-> 2x2 max-pool) blocks, global average pool, Linear head.

    Tensor names: ``features.{i}.conv``, ``features.{i}.bn``, ``fc``.
    """

    def __init__(self, in_channels: int, image_size: int, channels: list[int], n_classes: int,
                 kernel: int = 3, pool: bool = True):
        super().__init__()
        if not channels or min(channels) < 1:
            raise ValueError(f"cnn: channels must be a non-empty list of positive widths, got {channels!r}")
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"cnn: kernel must be a positive odd size, got {kernel}")
        if pool and image_size < 2 ** len(channels):
            raise ValueError(f"cnn: image_size {image_size} is too small for {len(channels)} 2x2 poolings "
                             f"(needs at least {2 ** len(channels)}); use fewer blocks or pool=false")
        blocks, c_in = [], in_channels
        for c in channels:
            blocks.append(nn.Sequential(OrderedDict(
                conv=nn.Conv2d(c_in, c, kernel, padding=kernel // 2, bias=False),
                bn=nn.BatchNorm2d(c),
                relu=nn.ReLU(),
                pool=nn.MaxPool2d(2) if pool else nn.Identity(),
            )))
            c_in = c
        self.features = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, n_classes)

    def forward(self, x):
        return self.fc(self.avgpool(self.features(x)).flatten(1))


def build_on_meta(spec: ArchSpec) -> nn.Module:
    """The model's module structure without allocating or initialising its weights."""
    with torch.device("meta"):
        return build_model(spec)


def module_axes(model: nn.Module, name: str, p_out: str | None, p_in: str | None = None) -> dict[str, tuple]:
    """Axes of every floating tensor of module ``name`` (Conv, Linear, BatchNorm).

    Weights are (out, in, *kernel) -> (p_out, p_in, None...); vectors (biases, BN affine and running
    statistics) follow p_out. Integer buffers (``num_batches_tracked``) are left out.
    """
    module = model.get_submodule(name)
    tensors = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
    axes = {}
    for t, v in tensors:
        if not v.is_floating_point():
            continue
        axes[f"{name}.{t}"] = (p_out,) if v.dim() == 1 else (p_out, p_in) + (None,) * (v.dim() - 2)
    return axes


def cnn_permutation_spec(spec: ArchSpec) -> PermutationSpec:
    """Each block's output channels get their own permutation: its conv rows, BN, and the next layer's input."""
    model = build_on_meta(spec)
    axes: dict[str, tuple] = {}
    p_prev = None
    for i in range(len(model.features)):
        p = f"P_features.{i}"
        axes |= module_axes(model, f"features.{i}.conv", p, p_prev)
        axes |= module_axes(model, f"features.{i}.bn", p)
        p_prev = p
    axes |= module_axes(model, "fc", None, p_prev)
    return PermutationSpec(axes)


register("cnn", CNN, cnn_permutation_spec)
