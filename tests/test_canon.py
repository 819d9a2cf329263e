import numpy as np
import pytest
import torch

from dwf_ray.archs import ArchSpec, build_model, permutation_spec
from dwf_ray.canon.matching import canonicalize, distance, weight_matching
from dwf_ray.archs.perm_spec import apply_permutation, random_permutation

ARCHS = [ArchSpec("mlp", {"in_dim": 64, "hidden": [32, 32], "out_dim": 10}),
         ArchSpec("mlp", {"in_dim": 8, "hidden": [16, 12, 20], "out_dim": 4, "activation": "tanh"})]


def random_state(arch: ArchSpec, seed: int) -> dict[str, np.ndarray]:
    torch.manual_seed(seed)
    return {k: v.detach().numpy().copy() for k, v in build_model(arch).named_parameters()}


def outputs(arch: ArchSpec, state: dict[str, np.ndarray], x: torch.Tensor) -> np.ndarray:
    model = build_model(arch)
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()})
    with torch.no_grad():
        return model.eval()(x).numpy()


@pytest.mark.parametrize("arch", ARCHS, ids=["digits-mlp", "deep-mlp"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_weight_matching_preserves_function_and_never_moves_away(arch, seed):
    spec = permutation_spec(arch)
    ref, other = random_state(arch, 0), random_state(arch, seed)
    moved, perm = canonicalize(spec, ref, other)
    assert any((p != np.arange(len(p))).any() for p in perm.values()), "matching found nothing to permute"
    x = torch.randn(64, arch.args["in_dim"])
    np.testing.assert_allclose(outputs(arch, moved, x), outputs(arch, other, x), rtol=1e-5, atol=1e-5)
    names = list(ref)
    assert distance(ref, moved, names) < distance(ref, other, names)


@pytest.mark.parametrize("arch", ARCHS, ids=["digits-mlp", "deep-mlp"])
def test_permuted_reference_maps_back_exactly(arch):
    spec = permutation_spec(arch)
    ref = random_state(arch, 0)
    for seed in range(3):
        scrambled = apply_permutation(spec, random_permutation(spec, ref, seed), ref)
        assert distance(ref, scrambled, list(ref)) > 1.0
        back, _ = canonicalize(spec, ref, scrambled)
        for k in ref:
            np.testing.assert_array_equal(back[k], ref[k])


def test_canonicalizing_twice_changes_nothing():
    arch = ARCHS[0]
    spec = permutation_spec(arch)
    ref, other = random_state(arch, 0), random_state(arch, 5)
    once, _ = canonicalize(spec, ref, other)
    twice, perm = canonicalize(spec, ref, once)
    assert all((p == np.arange(len(p))).all() for p in perm.values())
    for k in once:
        np.testing.assert_array_equal(once[k], twice[k])


def test_permutation_spec_of_mlp_names_every_hidden_axis():
    spec = permutation_spec(ARCHS[1])
    assert spec.axes["net.0.weight"] == ("P0", None)
    assert spec.axes["net.2.weight"] == ("P1", "P0")
    assert spec.axes["net.6.weight"] == (None, "P2")
    assert spec.sizes(random_state(ARCHS[1], 0)) == {"P0": 16, "P1": 12, "P2": 20}


def test_weight_matching_is_generic_over_the_spec():
    """A hand-written spec for a 2-layer net without the MLP helper: same guarantees."""
    from dwf_ray.archs.perm_spec import PermutationSpec
    spec = PermutationSpec({"a": ("H", None), "b": ("H",), "c": (None, "H")})
    rng = np.random.default_rng(0)
    ref = {"a": rng.normal(size=(9, 4)), "b": rng.normal(size=9), "c": rng.normal(size=(3, 9))}
    perm = {"H": rng.permutation(9)}
    other = apply_permutation(spec, perm, ref)
    found = weight_matching(spec, ref, other)
    np.testing.assert_array_equal(other["a"][found["H"]], ref["a"])
