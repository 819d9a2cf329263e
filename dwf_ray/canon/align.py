"""Canonicalizing one model, in one place: an architecture's weight matching set up once (layout, permutation
spec, device) and applied model by model. The canon stage's actor, eval's no-canon comparison and the
weight-space novelty (``eval/diversity.matched_nearest``) all call it."""
from __future__ import annotations

import numpy as np

from dwf_ray.archs import ArchSpec, permutation_spec
from dwf_ray.canon.matching import canonicalize
from dwf_ray.runtime import task_device
from dwf_ray.weights import WeightLayout


class Aligner:
    """Moves a model onto a reference by weight matching (TransFusion for attention). ``residual``: transformers'
    residual streams are matched too (``canon.residual``); ``device``: where to match (default: the task's)."""

    def __init__(self, arch: ArchSpec, residual: bool = False, max_iter: int = 100, seed: int = 0,
                 device: str | None = None):
        self.arch, self.residual, self.max_iter, self.seed = arch, residual, max_iter, seed
        self.layout, self.spec = WeightLayout.from_arch(arch), permutation_spec(arch)
        self.device = task_device() if device is None else device

    def onto(self, ref: dict[str, np.ndarray], state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``state`` (parameters and buffers) permuted onto ``ref``."""
        moved, _ = canonicalize(self.spec, ref, state, self.max_iter, self.seed, residual=self.residual,
                                device=self.device)
        return moved


def canonicalize_flat(arch_json: str, ref: np.ndarray, flat: np.ndarray, residual: bool = False) -> np.ndarray:
    """Each flat model weight-matched onto the flat reference: the canonical flat models."""
    aligner = Aligner(ArchSpec.from_json(arch_json), residual)
    layout = aligner.layout
    ref_state = layout.unflatten(ref)
    return np.stack([layout.flatten(aligner.onto(ref_state, layout.unflatten(v))) for v in flat])
