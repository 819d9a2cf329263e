"""torchvision VisionTransformer (packed attention projections), any number of input channels."""
from __future__ import annotations

import math

import torch.nn as nn

from dwf_ray.archs import ArchSpec, register
from dwf_ray.archs.perm_spec import AttentionSpec, PermutationSpec

RESIDUAL = "R"


def vit(image_size: int, patch_size: int, num_layers: int, num_heads: int, hidden_dim: int, mlp_dim: int,
        num_classes: int, in_channels: int = 3, dropout: float = 0.0, attention_dropout: float = 0.0) -> nn.Module:
    from torchvision.models import VisionTransformer

    model = VisionTransformer(image_size=image_size, patch_size=patch_size, num_layers=num_layers,
                              num_heads=num_heads, hidden_dim=hidden_dim, mlp_dim=mlp_dim, num_classes=num_classes,
                              dropout=dropout, attention_dropout=attention_dropout)
    if in_channels != 3:
        conv = nn.Conv2d(in_channels, hidden_dim, kernel_size=patch_size, stride=patch_size)
        fan_in = in_channels * patch_size * patch_size
        nn.init.trunc_normal_(conv.weight, std=math.sqrt(1 / fan_in))  # as torchvision initialises conv_proj
        nn.init.zeros_(conv.bias)
        model.conv_proj = conv
    return model


def vit_permutation_spec(spec: ArchSpec) -> PermutationSpec:
    """Per layer: attention heads (qk, vo, packed as qkv) and MLP hidden units; R: the residual stream."""
    args = spec.args
    e, r = args["hidden_dim"], RESIDUAL
    axes: dict[str, tuple] = {
        "class_token": (None, None, r), "conv_proj.weight": (r, None, None, None), "conv_proj.bias": (r,),
        "encoder.pos_embedding": (None, None, r), "encoder.ln.weight": (r,), "encoder.ln.bias": (r,),
        "heads.head.weight": (None, r), "heads.head.bias": (None,),
    }
    attention, concat = [], {}
    for i in range(args["num_layers"]):
        layer, p = f"encoder.layers.encoder_layer_{i}", f"L{i}"
        attn = f"{layer}.self_attention"
        qk, vo, qkv, mlp = f"{p}.qk", f"{p}.vo", f"{p}.qkv", f"{p}.mlp"
        axes.update({
            f"{layer}.ln_1.weight": (r,), f"{layer}.ln_1.bias": (r,),
            f"{attn}.in_proj_weight": (qkv, r), f"{attn}.in_proj_bias": (qkv,),
            f"{attn}.out_proj.weight": (r, vo), f"{attn}.out_proj.bias": (r,),
            f"{layer}.ln_2.weight": (r,), f"{layer}.ln_2.bias": (r,),
            f"{layer}.mlp.0.weight": (mlp, r), f"{layer}.mlp.0.bias": (mlp,),
            f"{layer}.mlp.3.weight": (r, mlp), f"{layer}.mlp.3.bias": (r,),
        })
        concat[qkv] = (qk, qk, vo)
        w = f"{attn}.in_proj_weight"
        attention.append(AttentionSpec(args["num_heads"], e, qk, vo, q=(w, 0), k=(w, e), v=(w, 2 * e)))
    return PermutationSpec(axes, tuple(attention), concat, residual=frozenset({r}))


register("vit", vit, vit_permutation_spec)
