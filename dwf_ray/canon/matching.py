"""Git Re-Basin weight matching (plus TransFusion for attention): permutations that bring a model onto a reference."""
from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from dwf_ray.archs.perm_spec import PermutationSpec, apply_permutation, permute_tensor, split_heads
from dwf_ray.canon.transfusion import head_spectra, match_heads, spectral_head_assignment


def _numpy(device) -> bool:
    return device is None or (isinstance(device, str) and device == "cpu")


def _on_device(state: dict[str, np.ndarray], device) -> dict:
    """float64 copies for matching: numpy arrays for None or "cpu", else torch tensors on that device."""
    if _numpy(device):
        return {k: np.asarray(v, dtype=np.float64) for k, v in state.items()}
    return {k: torch.as_tensor(np.asarray(v), dtype=torch.float64, device=device) for k, v in state.items()}


def _index(idx: np.ndarray, device):
    return idx if _numpy(device) else torch.as_tensor(idx, device=device)


def _units_first(w, axis: int):
    return w.movedim(axis, 0) if isinstance(w, torch.Tensor) else np.moveaxis(w, axis, 0)


def _similarity(spec: PermutationSpec, p: str, n: int, idx: dict, ref: dict, other: dict) -> np.ndarray:
    """A[i, j] = sum over tensors on p of <ref unit i, other unit j>, other's remaining axes permuted."""
    sim = 0.0
    for name, axis, seg in spec.uses(p):
        if name not in ref:
            continue
        w_a = _units_first(ref[name], axis)
        w_b = _units_first(permute_tensor(spec, idx, name, other[name], skip_axis=axis), axis)
        rows = slice(seg * n, (seg + 1) * n)
        sim = sim + w_a[rows].reshape(n, -1) @ w_b[rows].reshape(n, -1).T
    return sim.cpu().numpy() if isinstance(sim, torch.Tensor) else sim


def _improves(new: float, old: float) -> bool:
    return new > old + 1e-9 * max(1.0, abs(old))


def weight_matching(spec: PermutationSpec, ref: dict[str, np.ndarray], other: dict[str, np.ndarray],
                    max_iter: int = 100, seed: int = 0, *, residual: bool = False,
                    device: str | torch.device | None = None) -> dict[str, np.ndarray]:
    """Coordinate ascent on sum <ref, P(other)>: each step solves one permutation by linear assignment.

    Attention blocks are one step each (TransFusion): the spectral head assignment and the current head order
    are both tried with weight matching inside the heads, and the better one is kept.
    Starts from the identity and only accepts improvements, so the distance to the reference never grows.
    ``ref`` and ``other`` hold the tensors used for matching (parameters; buffers are left out).
    ``residual``: also permute the residual stream (the spec's ``residual`` permutations).
    ``device``: None or "cpu" computes the similarity matrices with numpy; another device ("cuda" on a GPU
    actor, or a ``torch.device``, also ``torch.device("cpu")``) with torch there. Assignments run on the CPU.
    """
    if not residual:
        spec = spec.without_residual()
    ref_t, other_t = _on_device(ref, device), _on_device(other, device)
    sizes = spec.sizes(ref)
    perm = spec.expand({p: np.arange(n) for p, n in sizes.items()})
    idx = {p: _index(v, device) for p, v in perm.items()}
    attention = {att.qk: att for att in spec.attention}
    spectral = {att.qk: spectral_head_assignment(r, o)
                for att, r, o in zip(spec.attention, head_spectra(spec, ref_t), head_spectra(spec, other_t))}

    def accept(new: dict[str, np.ndarray]) -> None:
        changed = {c for c, parts in spec.concat.items() if set(parts) & set(new)}
        perm.update(new)
        perm.update(spec.expand({p: v for p, v in perm.items() if p not in changed}))
        idx.update({p: _index(perm[p], device) for p in set(new) | changed})

    rng = np.random.default_rng(seed)
    units = sorted(spec.free(sizes) + list(attention))
    for _ in range(max_iter):
        improved = False
        for u in rng.permutation(units):
            if u in attention:
                att = attention[u]
                n = sizes[att.qk]
                sim_qk = _similarity(spec, att.qk, n, idx, ref_t, other_t)
                sim_vo = _similarity(spec, att.vo, n, idx, ref_t, other_t)
                old = sim_qk[np.arange(n), perm[att.qk]].sum() + sim_vo[np.arange(n), perm[att.vo]].sum()
                current_heads = split_heads(perm[att.qk], att.num_heads)[0]
                qk, vo, new = match_heads(sim_qk, sim_vo, [current_heads, spectral[u]])
                update = {att.qk: qk, att.vo: vo}
            else:
                n = sizes[u]
                sim = _similarity(spec, u, n, idx, ref_t, other_t)
                cols = linear_sum_assignment(sim, maximize=True)[1]
                old, new = sim[np.arange(n), perm[u]].sum(), sim[np.arange(n), cols].sum()
                update = {u: cols}
            if _improves(new, old):
                accept(update)
                improved = True
        if not improved:
            break
    return perm


def canonicalize(spec: PermutationSpec, ref: dict[str, np.ndarray], state: dict[str, np.ndarray],
                 max_iter: int = 100, seed: int = 0, *, residual: bool = False,
                 device: str | torch.device | None = None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(permuted state, permutations): ``state`` (parameters and buffers) moved onto ``ref``.

    ``residual`` and ``device`` as in :func:`weight_matching`.
    """
    if not residual:
        spec = spec.without_residual()
    params = {k: v for k, v in state.items() if k in ref}
    perm = weight_matching(spec, ref, params, max_iter=max_iter, seed=seed, residual=residual, device=device)
    return apply_permutation(spec, perm, state), perm


def distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray], names: list[str]) -> float:
    return float(np.sqrt(sum(float(((a[k].astype(np.float64) - b[k]) ** 2).sum()) for k in names)))
