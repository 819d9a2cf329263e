import numpy as np
import pytest
import torch

from dwf_ray.archs import ArchSpec, build_model
from dwf_ray.pca.reader import model_columns
from dwf_ray.weights import (CheckpointError, WeightLayout, load_checkpoint, load_model_state,
                             save_checkpoint)

ARCHS = [ArchSpec("mlp", {"in_dim": 64, "hidden": [32, 32], "out_dim": 10}),
         ArchSpec("mlp", {"in_dim": 4, "hidden": [7, 5, 3], "out_dim": 3, "activation": "gelu"})]


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: str(a.args["hidden"]))
def test_flatten_unflatten_round_trips_every_parameter(arch):
    model = build_model(arch)
    layout = WeightLayout.from_module(model)
    state = {k: v.detach().numpy() for k, v in model.named_parameters()}
    assert layout.size == sum(v.size for v in state.values())
    flat = layout.flatten(state)
    back = layout.unflatten(flat)
    assert list(back) == list(state)
    for k in state:
        np.testing.assert_array_equal(back[k], state[k])
    # the offsets tile the vector with no gap or overlap
    assert [e.offset for e in layout.entries] == list(np.cumsum([0] + [e.numel for e in layout.entries])[:-1])


def test_flatten_rejects_wrong_shapes_and_missing_names():
    layout = WeightLayout.from_arch(ARCHS[0])
    state = {e.name: np.zeros(e.shape, np.float32) for e in layout.entries}
    with pytest.raises(ValueError, match="net.0.weight"):
        layout.flatten({**state, "net.0.weight": np.zeros((3, 3), np.float32)})
    state.pop("net.2.bias")
    with pytest.raises(KeyError, match="net.2.bias"):
        layout.flatten(state)


def test_checkpoint_round_trip_and_ranged_reads(tmp_path):
    arch = ARCHS[1]
    model = build_model(arch)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    uri = str(tmp_path / "m.safetensors")
    sha = save_checkpoint(uri, state, arch, extra={"seed": "3"})
    assert len(sha) == 64
    tensors, meta = load_checkpoint(uri)
    assert ArchSpec.from_json(meta["arch"]) == arch and meta["seed"] == "3"
    loaded, arch2 = load_model_state(uri)
    assert arch2 == arch
    layout = WeightLayout.from_arch(arch)
    flat = layout.flatten(loaded)
    columns = model_columns(uri, layout)   # ranged reads of parts of the flat vector (the PCA reader)
    for a, b in [(0, layout.size), (3, 40), (27, 29), (layout.size - 5, layout.size)]:
        out = np.empty(b - a, dtype=np.float32)
        assert columns.read(a, b, out) == 4 * (b - a)
        np.testing.assert_array_equal(out, flat[a:b])


def test_torch_state_dict_files_import(tmp_path):
    arch = ARCHS[0]
    model = build_model(arch)
    path = tmp_path / "m.pt"
    torch.save(model.state_dict(), path)
    state, _ = load_model_state(str(path), arch)
    np.testing.assert_array_equal(state["net.0.weight"], model.net[0].weight.detach().numpy())


def test_bad_checkpoints_raise_errors_naming_file_and_problem(tmp_path):
    arch = ARCHS[0]
    state = {k: v.detach().numpy() for k, v in build_model(arch).state_dict().items()}
    good = tmp_path / "good.safetensors"
    save_checkpoint(str(good), state, arch)
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(good.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="trunc.safetensors.*(truncated|unreadable)"):
        load_model_state(str(trunc))
    nan = tmp_path / "nan.safetensors"
    save_checkpoint(str(nan), {**state, "net.2.weight": np.full((32, 32), np.nan, np.float32)}, arch)
    with pytest.raises(CheckpointError, match="nan.safetensors.*non-finite.*net.2.weight"):
        load_model_state(str(nan))
    wrong = tmp_path / "wrong.safetensors"
    save_checkpoint(str(wrong), {**state, "net.4.weight": np.zeros((10, 31), np.float32)}, arch)
    with pytest.raises(CheckpointError, match="wrong.safetensors.*net.4.weight.*shape"):
        load_model_state(str(wrong))
    with pytest.raises(CheckpointError, match="missing.safetensors.*not found"):
        load_model_state(str(tmp_path / "missing.safetensors"))
