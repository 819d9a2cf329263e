"""Git Re-Basin weight matching: find permutations that bring a model onto a reference."""
from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from dwf_ray.canon.perm_spec import PermutationSpec, apply_permutation, permute_tensor


def _similarity(spec: PermutationSpec, p: str, n: int, perm: dict[str, np.ndarray],
                ref: dict[str, np.ndarray], other: dict[str, np.ndarray]) -> np.ndarray:
    """A[i, j] = sum over tensors on p of <ref unit i, other unit j>, other's remaining axes permuted."""
    sim = np.zeros((n, n), dtype=np.float64)
    for name, axis in spec.perm_to_axes[p]:
        if name not in ref:
            continue
        w_a = np.moveaxis(ref[name], axis, 0).reshape(n, -1)
        w_b = np.moveaxis(permute_tensor(spec, perm, name, other[name], skip_axis=axis), axis, 0).reshape(n, -1)
        sim += w_a.astype(np.float64) @ w_b.T.astype(np.float64)
    return sim


def weight_matching(spec: PermutationSpec, ref: dict[str, np.ndarray], other: dict[str, np.ndarray],
                    max_iter: int = 100, seed: int = 0) -> dict[str, np.ndarray]:
    """Coordinate ascent on sum <ref, P(other)>: each step solves one permutation by linear assignment.

    Starts from the identity and only accepts improvements, so the distance to the reference never grows.
    ``ref`` and ``other`` hold the tensors used for matching (parameters; buffers are left out).
    """
    sizes = spec.sizes(ref)
    perm = {p: np.arange(n) for p, n in sizes.items()}
    rng = np.random.default_rng(seed)
    names = sorted(sizes)
    for _ in range(max_iter):
        improved = False
        for p in rng.permutation(names):
            n = sizes[p]
            sim = _similarity(spec, p, n, perm, ref, other)
            _, cols = linear_sum_assignment(sim, maximize=True)
            old, new = sim[np.arange(n), perm[p]].sum(), sim[np.arange(n), cols].sum()
            if new > old + 1e-9 * max(1.0, abs(old)):
                perm[p] = cols
                improved = True
        if not improved:
            break
    return perm


def canonicalize(spec: PermutationSpec, ref: dict[str, np.ndarray], state: dict[str, np.ndarray],
                 max_iter: int = 100, seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(permuted state, permutations): ``state`` (parameters and buffers) moved onto ``ref``."""
    params = {k: v for k, v in state.items() if k in ref}
    perm = weight_matching(spec, ref, params, max_iter=max_iter, seed=seed)
    return apply_permutation(spec, perm, state), perm


def distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray], names: list[str]) -> float:
    return float(np.sqrt(sum(float(((a[k].astype(np.float64) - b[k]) ** 2).sum()) for k in names)))
