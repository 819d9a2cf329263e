"""The convolutional families (BatchNorm, residual streams): their specs, layouts and torchvision parity
(the properties every family shares are in test_family_contracts.py)."""
import numpy as np
import pytest
import torch
import torchvision

from dwf_ray.archs import ArchSpec, build_model, permutation_spec
from dwf_ray.weights import CheckpointError, WeightLayout, validate_state
from tests.conftest import family_examples, random_state

ARCHS = {k: v for k, v in family_examples().items() if v.family in ("cnn", "resnet18", "resnet20")}
IDS = list(ARCHS)


def parameters(arch: ArchSpec, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: state[k] for k in WeightLayout.from_arch(arch).names}


@pytest.mark.parametrize("name", IDS)
def test_spec_covers_every_floating_tensor(name):
    """Every floating tensor is permuted on its channel axes, except the classifier's output axis."""
    arch = ARCHS[name]
    spec = permutation_spec(arch)
    state = random_state(arch, 0)
    head = {"fc.weight", "fc.bias"}
    assert set(state) - head <= set(spec.axes), sorted(set(state) - head - set(spec.axes))
    for k in set(state) - head:
        assert spec.axes[k][0] is not None, k
    assert spec.axes["fc.weight"][0] is None and spec.axes["fc.weight"][1] is not None
    assert not any(k.endswith("num_batches_tracked") for k in spec.axes)
    spec.sizes(state)  # every permutation acts on axes of one size


@pytest.mark.parametrize("name", IDS)
def test_layout_round_trips_and_validate_state_accepts_a_state_dict(name):
    arch = ARCHS[name]
    layout = WeightLayout.from_arch(arch)
    state = random_state(arch, 3)
    vec = layout.flatten(state)
    assert vec.shape == (sum(v.numel() for v in build_model(arch).parameters()),)
    back = layout.unflatten(vec)
    assert list(back) == layout.names
    for k, v in back.items():
        np.testing.assert_array_equal(v, state[k], err_msg=k)

    torch.manual_seed(0)
    state_dict = {k: v.numpy() for k, v in build_model(arch).state_dict().items()}  # incl. num_batches_tracked
    valid = validate_state(state_dict, arch, "model.pt")
    floating = {k for k, v in state_dict.items() if v.dtype.kind == "f"}
    assert set(valid) == floating and all(v.dtype == np.float32 for v in valid.values())
    bad = dict(state_dict, **{"fc.weight": state_dict["fc.weight"][:, :-1]})
    with pytest.raises(CheckpointError, match="model.pt.*fc.weight"):
        validate_state(bad, arch, "model.pt")


def test_resnet18_is_torchvision_resnet18():
    """Same tensor names, order and initialisation as torchvision, so its checkpoints load unchanged."""
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(num_classes=10)
    torch.manual_seed(0)
    ours = build_model(ArchSpec("resnet18", {"num_classes": 10}))
    a, b = tv.state_dict(), ours.state_dict()
    assert list(a) == list(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(tv.eval()(x), ours.eval()(x))
    cifar = build_model(ArchSpec("resnet18", {"num_classes": 10, "cifar_stem": True}))
    assert cifar.conv1.kernel_size == (3, 3) and cifar.conv1.stride == (1, 1)
    assert isinstance(cifar.maxpool, torch.nn.Identity)


def test_resnet_streams_share_one_permutation_per_stage():
    arch = ArchSpec("resnet20", {"num_classes": 10})
    spec = permutation_spec(arch)
    model = build_model(arch)
    assert sum(p.numel() for p in model.parameters()) == 272_474
    sizes = spec.sizes(random_state(arch, 0))
    streams = {"P_conv1": 16, "P_layer2.0.downsample": 32, "P_layer3.0.downsample": 64}
    inner = {f"P_layer{s + 1}.{b}.conv1": 16 * 2 ** s for s in range(3) for b in range(3)}
    assert sizes == streams | inner
    for s, stream in enumerate(streams):
        for b in range(3):
            assert spec.axes[f"layer{s + 1}.{b}.conv2.weight"][0] == stream
            assert spec.axes[f"layer{s + 1}.{b}.bn2.running_var"] == (stream,)
    assert spec.axes["layer2.0.conv1.weight"][1] == "P_conv1"
    assert spec.axes["layer2.0.downsample.0.weight"] == ("P_layer2.0.downsample", "P_conv1", None, None)
    assert spec.axes["fc.weight"] == (None, "P_layer3.0.downsample")


@pytest.mark.parametrize("args, match", [
    ({"in_channels": 1, "image_size": 4, "channels": [8, 8, 8], "n_classes": 3}, "image_size 4 is too small"),
    ({"in_channels": 1, "image_size": 8, "channels": [], "n_classes": 3}, "channels must be"),
])
def test_cnn_rejects_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        build_model(ArchSpec("cnn", args))
