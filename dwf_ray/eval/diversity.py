"""Novelty and diversity of generated models, measured in canonical weight space."""
from __future__ import annotations

import numpy as np


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


def zoo_nn_median(zoo: np.ndarray) -> float:
    """The zoo's own median nearest-neighbour distance: the unit of novelty."""
    dist, _ = nearest(zoo, zoo, exclude_self=True)
    return float(np.median(dist))


def novelty(models: np.ndarray, zoo: np.ndarray, zoo_median: float | None = None) -> dict:
    """Median distance to the nearest zoo model over the zoo's own median NN distance."""
    zoo_median = zoo_nn_median(zoo) if zoo_median is None else zoo_median
    dist, idx = nearest(models, zoo)
    return {"novelty_ratio": float(np.median(dist) / zoo_median), "nn_dist": dist, "nn_index": idx,
            "zoo_nn_median": zoo_median}


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
