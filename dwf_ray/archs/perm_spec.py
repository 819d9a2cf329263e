"""PermutationSpec in the Git Re-Basin form: which permutation acts on each axis of each tensor.

Transformers add two kinds of structure, kept as data so that matching stays generic:

- ``concat``: a permutation made of component permutations acting on consecutive equal segments of one axis
  (the packed ``in_proj_weight`` rows of ``nn.MultiheadAttention`` are [Q; K; V]: ``qkv = (qk, qk, vo)``);
- ``attention``: multi-head attention blocks. Their ``qk`` and ``vo`` permutations of the E-sized head axis are
  not free: each is a head permutation composed with one permutation inside every head (an index array over E,
  see :func:`compose_heads`). TransFusion (``dwf_ray.canon.transfusion``) solves them.

``residual`` names permutations of the transformer residual stream; they are applied only when asked for
(``canonicalize(..., residual=True)``), see :meth:`PermutationSpec.without_residual`.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, replace

import numpy as np
import torch


@dataclass(frozen=True)
class AttentionSpec:
    """One multi-head attention block: ``num_heads`` heads of ``embed_dim // num_heads`` dimensions.

    ``qk``: permutation of the query and key rows (heads and their dimensions; Q and K of a head share it).
    ``vo``: permutation of the value rows and of the output projection's input columns.
    ``q``, ``k``, ``v``: (weight tensor, first row) of the E rows of each projection (packed: 0, E, 2E).
    """

    num_heads: int
    embed_dim: int
    qk: str
    vo: str
    q: tuple[str, int]
    k: tuple[str, int]
    v: tuple[str, int]


@dataclass
class PermutationSpec:
    """``axes[name][i]`` names the permutation acting on axis i of tensor ``name`` (None: not permuted).

    Tensors absent from ``axes`` are never permuted. Buffers (BatchNorm statistics) may appear too:
    they follow their channels when a permutation is applied, but are not used for matching.
    """

    axes: dict[str, tuple]
    attention: tuple[AttentionSpec, ...] = ()
    concat: dict[str, tuple[str, ...]] = field(default_factory=dict)
    residual: frozenset[str] = frozenset()

    @property
    def perm_to_axes(self) -> dict[str, list[tuple[str, int]]]:
        out: dict[str, list[tuple[str, int]]] = defaultdict(list)
        for name, perms in self.axes.items():
            for axis, p in enumerate(perms):
                if p is not None:
                    out[p].append((name, axis))
        return dict(out)

    def uses(self, p: str) -> list[tuple[str, int, int]]:
        """(tensor, axis, segment) of every axis ``p`` acts on: segment k of a concat, or 0 when direct."""
        to_axes = self.perm_to_axes
        out = [(n, a, 0) for n, a in to_axes.get(p, [])]
        for c, parts in self.concat.items():
            out += [(n, a, k) for k, part in enumerate(parts) if part == p for n, a in to_axes.get(c, [])]
        return out

    @property
    def bound(self) -> set[str]:
        """Permutations not solved on their own: concat ones and the attention blocks' qk and vo."""
        return set(self.concat) | {p for a in self.attention for p in (a.qk, a.vo)}

    def sizes(self, state: dict[str, np.ndarray]) -> dict[str, int]:
        out = {}
        for p, uses in self.perm_to_axes.items():
            dims = {state[n].shape[a] for n, a in uses if n in state}
            if len(dims) != 1:
                raise ValueError(f"permutation {p!r} acts on axes of different sizes: {sorted(dims)}")
            out[p] = dims.pop()
        for c, parts in self.concat.items():
            if c not in out:
                continue
            seg, rest = divmod(out[c], len(parts))
            if rest:
                raise ValueError(f"permutation {c!r}: axis of size {out[c]} does not split into {len(parts)} parts")
            for part in parts:
                if out.setdefault(part, seg) != seg:
                    sizes = sorted({seg, out[part]})
                    raise ValueError(f"permutation {part!r} acts on axes of different sizes: {sizes}")
        return out

    def free(self, sizes: dict[str, int]) -> list[str]:
        """Permutations solved by one linear assignment each (all but the bound ones), sorted."""
        return sorted(p for p in sizes if p not in self.bound)

    def expand(self, perm: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``perm`` plus the concat permutations built from their components."""
        out = dict(perm)
        for c, parts in self.concat.items():
            if c not in out and all(p in perm for p in parts):
                seg = len(perm[parts[0]])
                out[c] = np.concatenate([np.asarray(perm[p]) + k * seg for k, p in enumerate(parts)])
        return out

    def without_residual(self) -> "PermutationSpec":
        """The same spec with the residual-stream permutations left out (those axes stay as they are)."""
        if not self.residual:
            return self
        axes = {n: tuple(None if p in self.residual else p for p in perms) for n, perms in self.axes.items()}
        return replace(self, axes=axes, residual=frozenset())


def compose_heads(head_perm: np.ndarray, intra: np.ndarray) -> np.ndarray:
    """Index array over the E = H * d head axis: position (h, i) takes unit ``intra[h, i]`` of head ``head_perm[h]``."""
    intra = np.asarray(intra)
    return (np.asarray(head_perm)[:, None] * intra.shape[1] + intra).reshape(-1)


def split_heads(idx: np.ndarray, num_heads: int) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`compose_heads`: (head permutation, per-head permutations of shape (H, d))."""
    d = len(idx) // num_heads
    blocks = np.asarray(idx).reshape(num_heads, d)
    return blocks[:, 0] // d, blocks % d


def permute_tensor(spec: PermutationSpec, perm: dict, name: str, w, skip_axis: int | None = None):
    """Apply every permutation of ``name``'s axes by index gathers (except ``skip_axis``).

    ``w`` and the index arrays of ``perm`` are numpy arrays, or torch tensors on one device.
    ``perm`` must hold the concat permutations too (:meth:`PermutationSpec.expand`).
    """
    for axis, p in enumerate(spec.axes.get(name, ())):
        if p is not None and axis != skip_axis:
            w = w.index_select(axis, perm[p]) if isinstance(w, torch.Tensor) else np.take(w, perm[p], axis=axis)
    return w


def apply_permutation(spec: PermutationSpec, perm: dict[str, np.ndarray], state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    perm = spec.expand(perm)
    return {name: permute_tensor(spec, perm, name, w) for name, w in state.items()}


def random_permutation(spec: PermutationSpec, state: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """A random function-preserving permutation; attention ones are random head and intra-head permutations."""
    rng = np.random.default_rng(seed)
    sizes, bound = spec.sizes(state), spec.bound
    out = {p: rng.permutation(n) for p, n in sizes.items() if p not in bound}
    for att in spec.attention:
        h, d = att.num_heads, sizes[att.qk] // att.num_heads
        heads = rng.permutation(h)
        for p in (att.qk, att.vo):
            out[p] = compose_heads(heads, np.stack([rng.permutation(d) for _ in range(h)]))
    return spec.expand(out)
