"""The properties every architecture family's PermutationSpec and weight matching must have, written once and
run over one example of every registered family (attention families with and without the residual stream)."""
import numpy as np
import pytest

from dwf_ray.archs import REGISTRY, permutation_spec
from dwf_ray.archs.perm_spec import apply_permutation, random_permutation
from dwf_ray.canon.matching import canonicalize, distance
from dwf_ray.weights import WeightLayout
from tests.conftest import assert_same_function, family_examples, random_state

EXAMPLES = family_examples()
CASES = [(name, residual) for name, arch in EXAMPLES.items()
         for residual in ((False, True) if permutation_spec(arch).residual else (False,))]
IDS = [f"{name}{'-residual' if residual else ''}" for name, residual in CASES]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def parameters(arch, state: dict) -> dict:
    """The reference that matching sees: parameters only (buffers are recalibrated, never matched)."""
    return {k: state[k] for k in WeightLayout.from_arch(arch).names}


def used_spec(arch, residual: bool):
    spec = permutation_spec(arch)
    return spec if residual else spec.without_residual()


def test_every_registered_family_has_an_example():
    assert {arch.family for arch in EXAMPLES.values()} == set(REGISTRY)


@pytest.mark.parametrize("name,residual", CASES, ids=IDS)
def test_a_permutation_keeps_the_function(name, residual):
    arch = EXAMPLES[name]
    spec, state = used_spec(arch, residual), random_state(arch, 0)
    for seed in range(2):
        scrambled = apply_permutation(spec, random_permutation(spec, state, seed), state)
        assert distance(state, scrambled, list(state)) > 1.0, "the permutation moved nothing"
        assert_same_function(arch, scrambled, state)


@pytest.mark.parametrize("name,residual", CASES, ids=IDS)
def test_a_permuted_reference_maps_back_exactly(name, residual):
    arch = EXAMPLES[name]
    spec, ref = used_spec(arch, residual), random_state(arch, 0)
    for seed in range(2):
        scrambled = apply_permutation(spec, random_permutation(spec, ref, seed), ref)
        back, _ = canonicalize(permutation_spec(arch), parameters(arch, ref), scrambled, residual=residual)
        for k in ref:  # buffers included: running statistics went back with their channels
            np.testing.assert_array_equal(back[k], ref[k], err_msg=k)


@pytest.mark.parametrize("name,residual", CASES, ids=IDS)
def test_canonicalizing_twice_changes_nothing(name, residual):
    arch = EXAMPLES[name]
    spec, ref = permutation_spec(arch), parameters(arch, random_state(arch, 0))
    once, _ = canonicalize(spec, ref, random_state(arch, 2), residual=residual)
    twice, perm = canonicalize(spec, ref, once, residual=residual)
    assert all((p == np.arange(len(p))).all() for p in perm.values())
    for k in once:
        np.testing.assert_array_equal(once[k], twice[k], err_msg=k)


@pytest.mark.parametrize("name,residual", CASES, ids=IDS)
def test_the_distance_never_grows_and_the_function_stays(name, residual):
    arch = EXAMPLES[name]
    spec = permutation_spec(arch)
    ref = parameters(arch, random_state(arch, 0))
    for seed in (1, 3):
        other = random_state(arch, seed)
        moved, perm = canonicalize(spec, ref, other, residual=residual)
        assert set(moved) == set(other)
        assert any((p != np.arange(len(p))).any() for p in perm.values()), "matching found nothing to permute"
        assert_same_function(arch, moved, other)
        assert distance(ref, moved, list(ref)) < distance(ref, other, list(ref))
