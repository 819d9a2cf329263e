"""Novelty of generated models: in function space (disagreement with the nearest zoo model on test inputs,
and the overlap of their mistakes) and, as a diagnostic, in canonical weight space up to permutation."""
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


def _nearest_rows(score, n_a: int, n_b: int, exclude_self: bool, block: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(best value, index) per row of a (n_a, n_b) matrix computed ``block`` rows at a time by
    ``score(rows) -> (len(rows), n_b)``, lower is better; ``exclude_self`` skips the diagonal."""
    best, idx = np.empty(n_a), np.empty(n_a, dtype=int)
    for start in range(0, n_a, block):
        rows = np.arange(start, min(start + block, n_a))
        m = score(rows).astype(np.float64)
        if exclude_self:
            m[np.arange(len(rows)), rows] = np.inf
        idx[rows] = m.argmin(1)
        best[rows] = m[np.arange(len(rows)), idx[rows]]
    return best, idx


def disagreement_nearest(preds: np.ndarray, zoo_preds: np.ndarray,
                         exclude_self: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """D(g) = min over zoo models t of the fraction of test inputs where g and t predict different classes,
    and that t. Permutation-invariant: no weight matching is needed. ``exclude_self``: ``preds`` is the zoo."""
    return _nearest_rows(lambda r: (preds[r][:, None, :] != zoo_preds[None]).mean(-1),
                         len(preds), len(zoo_preds), exclude_self)


def max_wrong_iou(wrong: np.ndarray, zoo_wrong: np.ndarray, exclude_self: bool = False) -> np.ndarray:
    """S(g) = max over zoo models t of IoU(wrong(g), wrong(t)) (p-diff's similarity; lower is more novel)."""
    def minus_iou(rows):
        inter = (wrong[rows][:, None, :] & zoo_wrong[None]).sum(-1)
        union = (wrong[rows][:, None, :] | zoo_wrong[None]).sum(-1)
        return -np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    best, _ = _nearest_rows(minus_iou, len(wrong), len(zoo_wrong), exclude_self)
    return -best
