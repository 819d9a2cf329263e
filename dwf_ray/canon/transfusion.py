"""TransFusion for multi-head attention: heads matched by their singular-value spectra, then neurons inside heads.

Per attention block: each head's singular values of its Q, K and V weight slices are computed once per model
(:func:`head_spectra`, one batched SVD per block); the head-to-head cost is the distance between spectra and a
linear assignment gives the head permutation (:func:`spectral_head_assignment`). Inside each matched head,
weight matching solves one permutation shared by Q and K and one for V and the output projection's input
columns (:func:`match_heads`). Spectra do not change under permutations of a head's rows or of the residual
stream, so they are never recomputed during coordinate ascent.

``dwf_ray.canon.matching.weight_matching`` runs this as one coordinate-ascent step per attention block; it also
tries the current head order and keeps whichever of the two brings the model closer, so that the distance to
the reference never grows (the paper always takes the spectral assignment).
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from dwf_ray.archs.perm_spec import AttentionSpec, PermutationSpec, compose_heads


def attention_spectra(att: AttentionSpec, state: dict[str, torch.Tensor]) -> np.ndarray:
    """(H, 3, d) singular values of every head's Q, K and V slices (descending), one batched SVD."""
    d = att.embed_dim // att.num_heads
    slices = [state[name][start:start + att.embed_dim].reshape(att.num_heads, d, -1)
              for name, start in (att.q, att.k, att.v)]
    return torch.linalg.svdvals(torch.stack(slices, dim=1).to(torch.float64)).cpu().numpy()


def head_spectra(spec: PermutationSpec, state: dict) -> list[np.ndarray]:
    """The spectra of every attention block of one model (numpy arrays or torch tensors)."""
    tensors = {k: torch.as_tensor(state[k]) for a in spec.attention for k in {a.q[0], a.k[0], a.v[0]}}
    return [attention_spectra(att, tensors) for att in spec.attention]


def spectral_head_assignment(ref_spectra: np.ndarray, other_spectra: np.ndarray) -> np.ndarray:
    """heads[h] = the other model's head matched to reference head h (sum over Q, K, V of spectra distances)."""
    cost = np.linalg.norm(ref_spectra[:, None] - other_spectra[None], axis=-1).sum(-1)
    return linear_sum_assignment(cost)[1]


def _intra(sim: np.ndarray, heads: np.ndarray) -> tuple[np.ndarray, float]:
    """Best permutation inside each matched head pair: (H, d) permutations and their total similarity."""
    num_heads = len(heads)
    d = sim.shape[0] // num_heads
    blocks = sim.reshape(num_heads, d, num_heads, d)
    perms, total = [], 0.0
    for h, g in enumerate(heads):
        block = blocks[h, :, g, :]
        cols = linear_sum_assignment(block, maximize=True)[1]
        perms.append(cols)
        total += block[np.arange(d), cols].sum()
    return np.stack(perms), total


def match_heads(sim_qk: np.ndarray, sim_vo: np.ndarray, candidates: list[np.ndarray]
                ) -> tuple[np.ndarray, np.ndarray, float]:
    """(qk, vo, similarity): for each candidate head permutation, weight-match inside the heads; keep the best.

    ``sim_qk[i, j]``: similarity of reference unit i and other unit j over every tensor the qk permutation
    acts on (Q and K rows and biases); ``sim_vo`` likewise (V rows and bias, output projection columns).
    """
    best = None
    for heads in candidates:
        qk_intra, qk_total = _intra(sim_qk, heads)
        vo_intra, vo_total = _intra(sim_vo, heads)
        total = qk_total + vo_total
        if best is None or total > best[2]:
            best = (compose_heads(heads, qk_intra), compose_heads(heads, vo_intra), total)
    return best
