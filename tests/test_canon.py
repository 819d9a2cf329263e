"""Weight matching of MLPs: the spec names every hidden axis, and the algorithm is generic over any spec
(the properties every family shares are in test_family_contracts.py)."""
import numpy as np

from dwf_ray.archs import permutation_spec
from dwf_ray.archs.perm_spec import apply_permutation
from dwf_ray.canon.matching import weight_matching
from tests.conftest import family_examples, random_state

DEEP_MLP = family_examples()["mlp-deep-tanh"]


def test_permutation_spec_of_mlp_names_every_hidden_axis():
    spec = permutation_spec(DEEP_MLP)
    assert spec.axes["net.0.weight"] == ("P0", None)
    assert spec.axes["net.2.weight"] == ("P1", "P0")
    assert spec.axes["net.6.weight"] == (None, "P2")
    assert spec.sizes(random_state(DEEP_MLP, 0)) == {"P0": 16, "P1": 12, "P2": 20}


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
