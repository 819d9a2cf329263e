import numpy as np
import pytest
import torch

from dwf_ray.archs import ArchSpec, build_model, permutation_spec
from dwf_ray.archs.perm_spec import apply_permutation, random_permutation
from dwf_ray.eval.diversity import candidates, matched_nearest, nearest, wrong_iou
from dwf_ray.weights import WeightLayout
from tests.conftest import random_flat_zoo

ARCH = ArchSpec("mlp", {"in_dim": 6, "hidden": [12, 8], "out_dim": 3})


def zoo_of(n: int) -> np.ndarray:
    return random_flat_zoo(ARCH, n)


def logits(flat: np.ndarray, x: torch.Tensor) -> np.ndarray:
    layout = WeightLayout.from_arch(ARCH)
    outs = []
    for vec in flat:
        model = build_model(ARCH)
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in layout.unflatten(vec).items()})
        with torch.no_grad():
            outs.append(model(x).numpy())
    return np.stack(outs)


def test_a_permuted_zoo_model_is_found_at_distance_zero():
    """Distances are taken up to permutation: an unaligned copy of a zoo model is no novelty at all."""
    zoo = zoo_of(6)
    layout, spec = WeightLayout.from_arch(ARCH), permutation_spec(ARCH)
    state = layout.unflatten(zoo[4])
    copy = layout.flatten(apply_permutation(spec, random_permutation(spec, state, 1), state))[None]
    direct, _ = nearest(copy, zoo)
    assert direct[0] > 1.0
    x = torch.randn(32, 6)
    cands = candidates(copy, zoo, logits(copy, x), logits(zoo, x))
    assert 4 in cands[0]                       # function space finds it although weights are unaligned
    dist, idx = matched_nearest(ARCH.to_json(), zoo, copy, cands)
    assert idx[0] == 4 and dist[0] < 1e-5


def test_matched_distance_never_exceeds_the_direct_one():
    zoo = zoo_of(8)
    x = torch.randn(32, 6)
    zl = logits(zoo, x)
    dist, _ = matched_nearest(ARCH.to_json(), zoo, zoo, candidates(zoo, zoo, zl, zl, exclude_self=True))
    direct, _ = nearest(zoo, zoo, exclude_self=True)
    assert (dist <= direct + 1e-6).all() and (dist > 0).all()


def test_wrong_prediction_iou():
    a = np.array([[1, 1, 0, 0], [0, 0, 0, 0]], bool)
    b = np.array([[1, 0, 1, 0], [0, 0, 0, 0]], bool)
    np.testing.assert_allclose(wrong_iou(a, b), [1 / 3, 1.0])


def test_margins_take_the_best_baseline_at_equal_functional_novelty_with_its_standard_error():
    from dwf_ray.eval.tradeoff import accepted, add_margins
    nov = "func_novelty"
    points = [{"method": "noise", "acc": 90.0, "se": 0.2, nov: 0.2},
              {"method": "noise", "acc": 80.0, "se": 0.4, nov: 0.4},
              {"method": "interpolation", "acc": 85.0, "se": 1.0, nov: 0.2},
              {"method": "interpolation", "acc": 84.0, "se": 1.0, nov: 0.4},
              {"method": "average", "acc": 70.0, "se": 0.5, nov: 0.3},
              {"method": "generator", "acc": 88.0, "se": 0.3, nov: 0.3},    # noise 85.0, interp 84.5
              {"method": "generator", "acc": 88.0, "se": 0.3, nov: 0.35}]   # noise 82.5, interp 84.25
    add_margins(points)
    near, far = points[5], points[6]
    assert near["best_baseline"] == "noise" and near["baselines_at"]["average"] == 70.0
    assert near["margin"] == pytest.approx(3.0) and near["margin_se"] == pytest.approx(np.hypot(0.3, 0.3))
    assert far["best_baseline"] == "interpolation"
    assert far["margin"] == pytest.approx(3.75) and far["margin_se"] == pytest.approx(np.hypot(0.3, 1.0))
    assert all("margin" not in p for p in points[:5])
    assert not accepted(near, 0.5) and accepted(near, 0.3)            # novel enough only for the lower bar
    assert not accepted({**near, "margin": 0.2}, 0.3)                  # inside one standard error
