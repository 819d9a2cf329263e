"""Novelty and diversity of generated models, measured in canonical weight space."""
from __future__ import annotations

import numpy as np

from dwf_ray.archs import ArchSpec, permutation_spec
from dwf_ray.canon.matching import canonicalize, distance
from dwf_ray.weights import WeightLayout


def pairwise_sq_dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    d = (a64 ** 2).sum(1)[:, None] + (b64 ** 2).sum(1)[None, :] - 2 * a64 @ b64.T
    return np.maximum(d, 0.0)


def nearest(a: np.ndarray, b: np.ndarray, exclude_self: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(distance, index) of each row of ``a``'s nearest row in ``b``."""
    d = pairwise_sq_dist(a, b)
    if exclude_self:
        np.fill_diagonal(d, np.inf)
    idx = d.argmin(1)
    return np.sqrt(d[np.arange(len(a)), idx]), idx


def candidates(models: np.ndarray, zoo: np.ndarray, model_logits: np.ndarray, zoo_logits: np.ndarray,
               per_space: int = 2, exclude_self: bool = False) -> np.ndarray:
    """Indices of the zoo models nearest to each model in weight space and in function space.

    Function space (logits on validation inputs) does not depend on how hidden units are ordered, so it
    finds the right zoo model even for a model that is not aligned with the zoo.
    """
    picks = []
    for a, b in ((models, zoo), (model_logits.reshape(len(models), -1), zoo_logits.reshape(len(zoo), -1))):
        d = pairwise_sq_dist(a, b)
        if exclude_self:
            np.fill_diagonal(d, np.inf)
        picks.append(np.argsort(d, axis=1)[:, :per_space])
    return np.concatenate(picks, axis=1)


def matched_nearest(arch_json: str, zoo: np.ndarray, models: np.ndarray, cands: np.ndarray,
                    residual: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(distance, index) of the nearest zoo model up to permutation: each model is weight-matched onto
    each of its candidate zoo models and the smallest distance is kept (never more than the direct one).
    ``residual``: transformers' residual streams are matched too (as ``canon.residual``)."""
    from dwf_ray.runtime import task_device
    arch = ArchSpec.from_json(arch_json)
    layout, spec, dev = WeightLayout.from_arch(arch), permutation_spec(arch), task_device()
    dist, idx = np.empty(len(models)), np.empty(len(models), dtype=int)
    for r, (vec, row) in enumerate(zip(models, cands)):
        state = layout.unflatten(vec)
        best = (np.inf, -1)
        for j in dict.fromkeys(int(c) for c in row):
            ref = layout.unflatten(zoo[j])
            moved, _ = canonicalize(spec, ref, state, residual=residual, device=dev)
            best = min(best, (distance(ref, moved, layout.names), j))
        dist[r], idx[r] = best
    return dist, idx


def zoo_nn_median(zoo: np.ndarray) -> float:
    """The zoo's own median nearest-neighbour distance: the unit of novelty."""
    dist, _ = nearest(zoo, zoo, exclude_self=True)
    return float(np.median(dist))


def wrong_iou(wrong_a: np.ndarray, wrong_b: np.ndarray) -> np.ndarray:
    """Row-wise IoU of the sets of misclassified test examples (1.0 when both are empty)."""
    inter = (wrong_a & wrong_b).sum(1)
    union = (wrong_a | wrong_b).sum(1)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def noise_baseline(zoo: np.ndarray, level: float, zoo_median: float, n: int, seed: int) -> np.ndarray:
    """Zoo models plus isotropic Gaussian noise of norm about ``level`` x the zoo's median NN distance."""
    rng = np.random.default_rng(seed)
    base = zoo[np.arange(n) % len(zoo)]
    noise = rng.standard_normal(base.shape) * (level * zoo_median / np.sqrt(zoo.shape[1]))
    return (base + noise).astype(np.float32)


def interpolation_baseline(zoo: np.ndarray, weight: float, n: int, seed: int) -> np.ndarray:
    """(1 - w) a + w b for random pairs of distinct aligned zoo models."""
    rng = np.random.default_rng(seed)
    i = rng.integers(len(zoo), size=n)
    j = (i + rng.integers(1, len(zoo), size=n)) % len(zoo)
    return ((1 - weight) * zoo[i] + weight * zoo[j]).astype(np.float32)
