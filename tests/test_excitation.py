"""The excitation ratio: how much a weight change moves a layer's outputs on real inputs, against isotropic noise."""
import numpy as np
import torch
import torch.nn.functional as F

from dwf_ray.archs import ArchSpec, build_model
from dwf_ray.analysis.excitation import excitation_ratio, input_moments


def params(arch: ArchSpec, seed: int) -> dict[str, np.ndarray]:
    torch.manual_seed(seed)
    return {k: v.detach().numpy().copy() for k, v in build_model(arch).state_dict().items()}


def test_a_change_counts_only_in_the_directions_the_inputs_reach():
    """Inputs vary along their first coordinate only: a change there excites the layer m times as much as
    isotropic noise of the same norm (m inputs), a change along an input that is always zero not at all."""
    arch = ArchSpec("mlp", {"in_dim": 6, "hidden": [8], "out_dim": 3})
    a = params(arch, 0)
    x = torch.zeros(200, 6)
    x[:, 0] = torch.randn(200)
    moments = input_moments(arch, a, x)
    assert set(moments) == {"net.0", "net.2"} and moments["net.0"].shape == (6, 6)

    def changed(column: int) -> dict[str, np.ndarray]:
        delta = np.zeros((8, 6), np.float32)
        delta[:, column] = 1.0
        return {**a, "net.0.weight": a["net.0.weight"] + delta}

    assert np.isclose(excitation_ratio(moments, a, changed(0)), 6.0)
    assert excitation_ratio(moments, a, changed(5)) == 0.0
    b = params(arch, 1)   # an independent model: positive, and at most the largest layer's bound (8 inputs)
    assert 0 < excitation_ratio(moments, a, b) <= 8


def test_conv_moments_give_the_output_energy_of_a_weight_change():
    """tr(D C D^T) from the unfolded patches equals the mean energy of conv(x, D) per output position."""
    arch = ArchSpec("cnn", {"in_channels": 1, "image_size": 8, "channels": [4, 6], "n_classes": 3})
    a, b = params(arch, 0), params(arch, 1)
    x = torch.randn(16, 1, 8, 8)
    moments = input_moments(arch, a, x)
    name = "features.0.conv"
    d = b[f"{name}.weight"] - a[f"{name}.weight"]
    c = moments[name]
    energy = float(np.einsum("oi,ij,oj->", d.reshape(len(d), -1), c, d.reshape(len(d), -1)))
    out = F.conv2d(x.double(), torch.from_numpy(d).double(), padding=1)   # (16, 4, 8, 8)
    direct = float((out ** 2).sum(1).mean())
    assert np.isclose(energy, direct, rtol=1e-9)
    only_first = {k: (b[k] if k == f"{name}.weight" else a[k]) for k in a}
    expected = energy / (float((d ** 2).sum()) * np.trace(c) / c.shape[0])
    assert np.isclose(excitation_ratio(moments, a, only_first), expected)
