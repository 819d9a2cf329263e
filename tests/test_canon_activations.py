"""Activation matching (canon.method=activations): exact on permuted copies, function-preserving, clear errors."""
import numpy as np
import pytest
import torch

from dwf_ray.archs import ArchSpec, build_model, permutation_spec
from dwf_ray.canon.activations import ActivationMatcher
from dwf_ray.canon.matching import canonicalize
from dwf_ray.archs.perm_spec import apply_permutation, random_permutation
from dwf_ray.weights import to_module
from tests.conftest import example_inputs, family_examples, random_state

ARCHS = {k: family_examples()[k] for k in ("mlp", "mlp-residual", "cnn", "resnet20", "resnet18-cifar")}


def inputs(arch: ArchSpec) -> torch.Tensor:
    return example_inputs(arch, 64 if arch.family == "mlp" else 32, seed=7)


@pytest.mark.parametrize("name", list(ARCHS))
def test_permuted_reference_maps_back_exactly(name):
    arch = ARCHS[name]
    spec, ref = permutation_spec(arch), random_state(arch, 0)
    match = ActivationMatcher(arch, ref, inputs(arch))
    for seed in range(2):
        scrambled = apply_permutation(spec, random_permutation(spec, ref, seed), ref)
        back, _ = match(scrambled)
        for k in ref:
            np.testing.assert_array_equal(back[k], ref[k], err_msg=k)


@pytest.mark.parametrize("name", list(ARCHS))
def test_matching_an_independent_model_preserves_its_function(name):
    arch = ARCHS[name]
    other = random_state(arch, 3)
    moved, perm = ActivationMatcher(arch, random_state(arch, 0), inputs(arch))(other)
    assert any((p != np.arange(len(p))).any() for p in perm.values()), "matching found nothing to permute"
    x = inputs(arch)
    with torch.no_grad():
        np.testing.assert_allclose(to_module(arch, moved)(x).numpy(), to_module(arch, other)(x).numpy(),
                                   rtol=1e-4, atol=1e-4)


def test_attention_models_are_refused_with_a_clear_error():
    vit = ArchSpec("vit", {"image_size": 8, "patch_size": 2, "num_layers": 1, "num_heads": 2, "hidden_dim": 8,
                           "mlp_dim": 16, "num_classes": 10, "in_channels": 1})
    state = {k: v.numpy() for k, v in build_model(vit).state_dict().items()}
    with pytest.raises(ValueError, match="'vit' has attention blocks; use canon.method=weights"):
        ActivationMatcher(vit, state, torch.zeros(2, 1, 8, 8))


@pytest.mark.parametrize("name", ["cnn", "resnet20"])
def test_units_correlate_with_the_reference_at_least_as_well_as_after_weight_matching(name):
    arch = ARCHS[name]
    ref, other = random_state(arch, 0), random_state(arch, 4)
    match = ActivationMatcher(arch, ref, inputs(arch))

    def correlation(state):   # summed correlation of each unit with the reference unit in its position
        acts = match.unit_activations(state)
        return sum(float((r * o).sum()) for p in match.ref for r, o in zip(match.ref[p], acts[p]))

    by_activations, _ = match(other)
    by_weights, _ = canonicalize(permutation_spec(arch), ref, other)
    assert correlation(by_activations) >= correlation(by_weights) - 1e-3
    assert correlation(by_activations) > correlation(other) + 1.0
