"""PermutationSpec in the Git Re-Basin form: which permutation acts on each axis of each tensor."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np


@dataclass
class PermutationSpec:
    """``axes[name][i]`` names the permutation acting on axis i of tensor ``name`` (None: not permuted).

    Tensors absent from ``axes`` are never permuted. Buffers (BatchNorm statistics) may appear too:
    they follow their channels when a permutation is applied, but are not used for matching.
    """

    axes: dict[str, tuple]

    @property
    def perm_to_axes(self) -> dict[str, list[tuple[str, int]]]:
        out: dict[str, list[tuple[str, int]]] = defaultdict(list)
        for name, perms in self.axes.items():
            for axis, p in enumerate(perms):
                if p is not None:
                    out[p].append((name, axis))
        return dict(out)

    def sizes(self, state: dict[str, np.ndarray]) -> dict[str, int]:
        out = {}
        for p, uses in self.perm_to_axes.items():
            dims = {state[n].shape[a] for n, a in uses if n in state}
            if len(dims) != 1:
                raise ValueError(f"permutation {p!r} acts on axes of different sizes: {sorted(dims)}")
            out[p] = dims.pop()
        return out


def permute_tensor(spec: PermutationSpec, perm: dict[str, np.ndarray], name: str, w: np.ndarray,
                   skip_axis: int | None = None) -> np.ndarray:
    """Apply every permutation of ``name``'s axes by index gathers (except ``skip_axis``)."""
    for axis, p in enumerate(spec.axes.get(name, ())):
        if p is not None and axis != skip_axis:
            w = np.take(w, perm[p], axis=axis)
    return w


def apply_permutation(spec: PermutationSpec, perm: dict[str, np.ndarray], state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name: permute_tensor(spec, perm, name, w) for name, w in state.items()}


def random_permutation(spec: PermutationSpec, state: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {p: rng.permutation(n) for p, n in spec.sizes(state).items()}
