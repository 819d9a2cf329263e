"""ResNets with torchvision's layout and tensor names: "resnet18" (optionally CIFAR stem, any width), "resnet20"."""
from __future__ import annotations

import torch.nn as nn

from dwf_ray.archs import ArchSpec, register
from dwf_ray.archs.cnn import build_on_meta, module_axes
from dwf_ray.archs.perm_spec import PermutationSpec


class ResNet(nn.Module):
    """torchvision's ResNet (conv1, bn1, relu, maxpool, layer1.., avgpool, fc) of BasicBlocks, any stage widths.

    With ``stage_widths=[64, 128, 256, 512]`` and ``blocks_per_stage=[2, 2, 2, 2]`` it is
    ``torchvision.models.resnet18``: same modules, creation order and initialisation. ``cifar_stem``
    replaces the 7x7 stride-2 conv1 by a 3x3 stride-1 conv and the max-pool by an Identity.
    """

    def __init__(self, stage_widths: list[int], blocks_per_stage: list[int], num_classes: int,
                 in_channels: int = 3, cifar_stem: bool = False):
        from torchvision.models.resnet import BasicBlock, conv1x1  # here: importing torchvision costs ~1 s
        super().__init__()
        if len(stage_widths) != len(blocks_per_stage) or not stage_widths:
            raise ValueError(f"resnet: need one block count per stage, got widths {stage_widths} "
                             f"and blocks {blocks_per_stage}")
        if min(stage_widths) < 1 or min(blocks_per_stage) < 1:
            raise ValueError(f"resnet: widths and block counts must be positive, got {stage_widths}, "
                             f"{blocks_per_stage}")
        inplanes = stage_widths[0]
        if cifar_stem:
            self.conv1 = nn.Conv2d(in_channels, inplanes, kernel_size=3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if cifar_stem else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.n_stages = len(stage_widths)
        for i, (planes, n_blocks) in enumerate(zip(stage_widths, blocks_per_stage)):
            blocks = []
            for j in range(n_blocks):
                stride = 2 if i > 0 and j == 0 else 1
                downsample = None
                if stride != 1 or inplanes != planes:
                    downsample = nn.Sequential(conv1x1(inplanes, planes, stride), nn.BatchNorm2d(planes))
                blocks.append(BasicBlock(inplanes, planes, stride, downsample))
                inplanes = planes
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(inplanes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.n_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(self.avgpool(x).flatten(1))


def resnet18(num_classes: int, in_channels: int = 3, cifar_stem: bool = False, width: int = 64) -> ResNet:
    """torchvision's resnet18 at ``width=64``; ``width`` scales every stage (w, 2w, 4w, 8w)."""
    return ResNet([width, 2 * width, 4 * width, 8 * width], [2, 2, 2, 2], num_classes, in_channels, cifar_stem)


def resnet20(num_classes: int, in_channels: int = 3, width: int = 16, blocks_per_stage: int = 3) -> ResNet:
    """CIFAR ResNet-20 (He et al. 2016) with 1x1 conv + BN shortcuts where the shape changes."""
    return ResNet([width, 2 * width, 4 * width], [blocks_per_stage] * 3, num_classes, in_channels, cifar_stem=True)


def resnet_permutation_spec(spec: ArchSpec) -> PermutationSpec:
    """Git Re-Basin spec of a ResNet, derived from its modules.

    The residual stream has one permutation from the stem (conv1/bn1) through every block's output
    (conv2/bn2) until a block with a downsample shortcut, whose 1x1 conv/BN start the next stream
    permutation. Each block's inner channels (conv1/bn1 -> conv2 input) have their own permutation.
    The fc input follows the last stream.
    """
    from torchvision.models.resnet import BasicBlock
    model = build_on_meta(spec)
    stream = "P_conv1"
    axes = module_axes(model, "conv1", stream) | module_axes(model, "bn1", stream)
    for name, block in model.named_modules():
        if not isinstance(block, BasicBlock):
            continue
        block_in = stream
        if block.downsample is not None:
            stream = f"P_{name}.downsample"
            axes |= module_axes(model, f"{name}.downsample.0", stream, block_in)
            axes |= module_axes(model, f"{name}.downsample.1", stream)
        inner = f"P_{name}.conv1"
        axes |= module_axes(model, f"{name}.conv1", inner, block_in) | module_axes(model, f"{name}.bn1", inner)
        axes |= module_axes(model, f"{name}.conv2", stream, inner) | module_axes(model, f"{name}.bn2", stream)
    return PermutationSpec(axes | module_axes(model, "fc", None, stream))


register("resnet18", resnet18, resnet_permutation_spec)
register("resnet20", resnet20, resnet_permutation_spec)
