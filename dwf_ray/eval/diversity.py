"""Novelty of generated models: in function space (disagreement with the nearest zoo model on test inputs,
and the overlap of their mistakes) and, as a diagnostic, in canonical weight space up to permutation.

Predictions and mistakes are compared bit-packed (``ModelOutputs``: 64 test inputs a word), block by block of
the zoo, so that a zoo of thousands of models is compared in Ray tasks and the counts stay exact integers.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dwf_ray.archs import ArchSpec
from dwf_ray.canon.align import Aligner
from dwf_ray.canon.matching import distance


def pairwise_sq_dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    d = (a64 ** 2).sum(1)[:, None] + (b64 ** 2).sum(1)[None, :] - 2 * a64 @ b64.T
    return np.maximum(d, 0.0)


def sample_rows(n: int, size: int, seed: int) -> np.ndarray:
    """Rows 0..n-1 when ``n <= size``; otherwise ``size`` of them drawn uniformly without replacement with
    ``seed``, in increasing order (the zoo models its own reference statistics are measured on)."""
    if n <= size:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


def _own_rows(n: int, exclude_self: bool) -> np.ndarray | None:
    return np.arange(n) if exclude_self else None


def _leave_out(m: np.ndarray, skip: np.ndarray | None, start: int = 0) -> None:
    """m[r, skip[r] - start] = inf where that column is in m: a model is not its own neighbour."""
    if skip is None:
        return
    cols = np.asarray(skip) - start
    rows = np.flatnonzero((cols >= 0) & (cols < m.shape[1]))
    m[rows, cols[rows]] = np.inf


def _nearest_rows(score, n_a: int, n_b: int, skip: np.ndarray | None = None,
                  block: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(best value, index) per row of a (n_a, n_b) matrix computed ``block`` rows at a time by
    ``score(rows) -> (len(rows), n_b)``, lower is better (the first index on ties); ``skip``: for each row, a
    column to leave out (the model itself), or None."""
    best, idx = np.empty(n_a), np.empty(n_a, dtype=int)
    for start in range(0, n_a, block):
        rows = np.arange(start, min(start + block, n_a))
        m = score(rows).astype(np.float64)
        if skip is not None:
            _leave_out(m, skip[rows])
        idx[rows] = m.argmin(1)
        best[rows] = m[np.arange(len(rows)), idx[rows]]
    return best, idx


def nearest(a: np.ndarray, b: np.ndarray, exclude_self: bool = False,
            skip: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(distance, index) of each row of ``a``'s nearest row in ``b``; ``exclude_self``: ``a`` is ``b``;
    ``skip``: for each row of ``a``, the row of ``b`` that is itself. 1,024 rows of ``a`` at a time."""
    skip = _own_rows(len(a), exclude_self) if skip is None else skip
    best, idx = _nearest_rows(lambda r: pairwise_sq_dist(a[r], b), len(a), len(b), skip, block=1024)
    return np.sqrt(best), idx


def nearest_k(a: np.ndarray, b: np.ndarray, k: int, skip: np.ndarray | None = None,
              start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` rows of ``b`` nearest to each row of ``a``: (squared distances, ascending; their indices).
    ``b`` is rows ``start``.. of a larger matrix: indices and ``skip`` (a row to leave out per row of ``a``)
    count from that matrix's first row."""
    d = pairwise_sq_dist(a, b)
    _leave_out(d, skip, start)
    order = np.argsort(d, axis=1)[:, :k]
    return np.take_along_axis(d, order, 1), order + start


def merge_k(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest over consecutive blocks of ``b`` (``parts``: ``nearest_k`` of each block, in order)."""
    d = np.concatenate([p[0] for p in parts], axis=1)
    idx = np.concatenate([p[1] for p in parts], axis=1)
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, order, 1), np.take_along_axis(idx, order, 1)


def candidates(models: np.ndarray, zoo: np.ndarray, model_logits: np.ndarray, zoo_logits: np.ndarray,
               per_space: int = 2, exclude_self: bool = False) -> np.ndarray:
    """Indices of the zoo models nearest to each model in weight space and in function space.

    Function space (logits on validation inputs) does not depend on how hidden units are ordered, so it
    finds the right zoo model even for a model that is not aligned with the zoo.
    """
    skip = _own_rows(len(models), exclude_self)
    spaces = ((models, zoo), (model_logits.reshape(len(models), -1), zoo_logits.reshape(len(zoo), -1)))
    return np.concatenate([nearest_k(a, b, per_space, skip)[1] for a, b in spaces], axis=1)


def matched_nearest(arch_json: str, zoo: np.ndarray, models: np.ndarray, cands: np.ndarray,
                    residual: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(distance, index) of the nearest zoo model up to permutation: each model is weight-matched onto
    each of its candidate zoo models and the smallest distance is kept (never more than the direct one).
    ``residual``: transformers' residual streams are matched too (as ``canon.residual``)."""
    aligner = Aligner(ArchSpec.from_json(arch_json), residual)
    layout = aligner.layout
    dist, idx = np.empty(len(models)), np.empty(len(models), dtype=int)
    for r, (vec, row) in enumerate(zip(models, cands)):
        state = layout.unflatten(vec)
        best = (np.inf, -1)
        for j in dict.fromkeys(int(c) for c in row):
            ref = layout.unflatten(zoo[j])
            best = min(best, (distance(ref, aligner.onto(ref, state), layout.names), j))
        dist[r], idx[r] = best
    return dist, idx


def zoo_nn_median(zoo: np.ndarray, rows: np.ndarray | None = None) -> float:
    """The zoo's own median nearest-neighbour distance: the unit of novelty. ``rows``: measured on these zoo
    models only (a sample), each against the whole zoo."""
    if rows is None:
        dist, _ = nearest(zoo, zoo, exclude_self=True)
    else:
        dist, _ = nearest(zoo[rows], zoo, skip=np.asarray(rows))
    return float(np.median(dist))


def wrong_iou(wrong_a: np.ndarray, wrong_b: np.ndarray) -> np.ndarray:
    """Row-wise IoU of the sets of misclassified test examples (1.0 when both are empty)."""
    inter = (wrong_a & wrong_b).sum(1)
    union = (wrong_a | wrong_b).sum(1)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


# -- function space, bit-packed -------------------------------------------------------------------------------
def pack_bits(mask: np.ndarray) -> np.ndarray:
    """(n, m) booleans -> (n, ceil(m / 64)) uint64 words, zero-padded: one bitwise operation compares 64."""
    packed = np.packbits(np.asarray(mask, dtype=bool), axis=1)
    return np.pad(packed, ((0, 0), (0, -packed.shape[1] % 8))).view(np.uint64)


def pack_classes(preds: np.ndarray, n_classes: int) -> np.ndarray:
    """(n, m) class ids -> (planes, n, words): plane p holds bit p of every prediction, packed. Two models
    predict the same class on an input exactly when no plane differs there."""
    preds = np.asarray(preds)
    planes = max(1, (int(n_classes) - 1).bit_length())
    return np.stack([pack_bits((preds >> p) & 1) for p in range(planes)])


def _count_pairs(a: np.ndarray, b: np.ndarray, combine, block: int = 256) -> np.ndarray:
    """(n_a, n_b) numbers of set bits of ``combine(a[:, i], b[:, j])`` for packed (planes, n, words) arrays,
    ``block`` rows of ``b`` at a time (they stay in cache while every row of ``a`` passes); ``combine(x, y,
    out, scratch)`` writes its words into ``out``."""
    out = np.empty((a.shape[1], b.shape[1]), np.int64)
    for s in range(0, b.shape[1], block):
        zb = b[:, s:s + block]
        words, scratch = np.empty(zb.shape[1:], np.uint64), np.empty(zb.shape[1:], np.uint64)
        for i in range(a.shape[1]):
            combine(a[:, i], zb, words, scratch)
            out[i, s:s + block] = np.bitwise_count(words).sum(1)
    return out


def _differ(x: np.ndarray, y: np.ndarray, out: np.ndarray, scratch: np.ndarray) -> None:
    np.bitwise_xor(x[0], y[0], out=out)
    for p in range(1, len(x)):
        out |= np.bitwise_xor(x[p], y[p], out=scratch)


def _both(x: np.ndarray, y: np.ndarray, out: np.ndarray, scratch: np.ndarray) -> None:
    np.bitwise_and(x[0], y[0], out=out)


def _disagreement_nearest(a: np.ndarray, b: np.ndarray, n_test: int, skip) -> tuple[np.ndarray, np.ndarray]:
    return _nearest_rows(lambda r: _count_pairs(a[:, r], b, _differ) / n_test, a.shape[1], b.shape[1], skip)


def _max_wrong_iou(a: np.ndarray, n_a: np.ndarray, b: np.ndarray, n_b: np.ndarray, skip) -> np.ndarray:
    def minus_iou(rows):
        inter = _count_pairs(a[None, rows], b[None], _both)
        union = n_a[rows][:, None] + n_b[None, :] - inter
        return -np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    best, _ = _nearest_rows(minus_iou, len(a), len(b), skip)
    return -best


def disagreement_nearest(preds: np.ndarray, zoo_preds: np.ndarray,
                         exclude_self: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """D(g) = min over zoo models t of the fraction of test inputs where g and t predict different classes,
    and that t. Permutation-invariant: no weight matching is needed. ``exclude_self``: ``preds`` is the zoo."""
    n_classes = int(max(preds.max(), zoo_preds.max())) + 1
    return _disagreement_nearest(pack_classes(preds, n_classes), pack_classes(zoo_preds, n_classes),
                                 preds.shape[1], _own_rows(len(preds), exclude_self))


def max_wrong_iou(wrong: np.ndarray, zoo_wrong: np.ndarray, exclude_self: bool = False) -> np.ndarray:
    """S(g) = max over zoo models t of IoU(wrong(g), wrong(t)) (p-diff's similarity; lower is more novel)."""
    return _max_wrong_iou(pack_bits(wrong), wrong.sum(1), pack_bits(zoo_wrong), zoo_wrong.sum(1),
                          _own_rows(len(wrong), exclude_self))


@dataclass
class ModelOutputs:
    """What novelty needs of a block of models, compact: predicted test classes as bit planes, mistakes as a
    bit mask (64 test inputs a word), and logits on validation inputs (weight matching's function-space
    candidates; None when weight novelty is not measured)."""
    classes: np.ndarray                 # (planes, n, words) uint64, from pack_classes
    wrong: np.ndarray                   # (n, words) uint64: misclassified test inputs
    n_wrong: np.ndarray                 # (n,) mistakes per model
    n_test: int
    logits: np.ndarray | None = None    # (n, validation inputs, classes)

    @classmethod
    def of(cls, preds: np.ndarray, wrong: np.ndarray, n_classes: int, logits: np.ndarray | None = None):
        return cls(pack_classes(preds, n_classes), pack_bits(wrong), np.asarray(wrong).sum(1), preds.shape[1],
                   logits)

    def __len__(self) -> int:
        return len(self.n_wrong)

    def take(self, rows: np.ndarray) -> "ModelOutputs":
        return ModelOutputs(self.classes[:, rows], self.wrong[rows], self.n_wrong[rows], self.n_test,
                            None if self.logits is None else self.logits[rows])

    @staticmethod
    def concat(blocks: list["ModelOutputs"]) -> "ModelOutputs":
        first = blocks[0]
        return ModelOutputs(np.concatenate([b.classes for b in blocks], axis=1),
                            np.concatenate([b.wrong for b in blocks]), np.concatenate([b.n_wrong for b in blocks]),
                            first.n_test,
                            None if first.logits is None else np.concatenate([b.logits for b in blocks]))


def nearest_in_block(models: ModelOutputs, block: ModelOutputs, start: int = 0,
                     skip: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each model against zoo models ``start``..``start + len(block)``: (D, the zoo index where it is reached,
    S). ``skip``: each model's own zoo index (the zoo against itself), or None."""
    local = None if skip is None else np.asarray(skip) - start
    d, idx = _disagreement_nearest(models.classes, block.classes, models.n_test, local)
    s = _max_wrong_iou(models.wrong, models.n_wrong, block.wrong, block.n_wrong, local)
    return d, idx + start, s


def merge_blocks(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]]):
    """(D, index, S) over the whole zoo from ``nearest_in_block`` of consecutive blocks, in order: the
    smallest D (the first index on ties, as one pass over the zoo) and the largest S."""
    d, idx, s = (np.array(x, copy=True) for x in parts[0])
    for d_b, idx_b, s_b in parts[1:]:
        closer = d_b < d
        d[closer], idx[closer] = d_b[closer], idx_b[closer]
        s = np.maximum(s, s_b)
    return d, idx, s
