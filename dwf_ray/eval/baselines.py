"""Simple generators the flow must beat at equal functional novelty, each at several strengths.

Every function returns ``n`` flat models (float32) built from the aligned (canonical) zoo, seeded:
- isotropic noise on zoo models (norm = level x the zoo's median nearest-neighbour distance);
- noise scaled per layer (sigma x each tensor's weight RMS);
- averages of k distinct random zoo models;
- interpolations (1 - w) a + w b of random pairs of distinct zoo models;
- a per-coordinate Gaussian N(zoo mean, (scale x zoo std)^2).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from dwf_ray.config import EvalConfig
from dwf_ray.weights import WeightLayout


def noise_baseline(zoo: np.ndarray, level: float, zoo_median: float, n: int, seed: int) -> np.ndarray:
    """Zoo models plus isotropic Gaussian noise of norm about ``level`` x the zoo's median NN distance."""
    rng = np.random.default_rng(seed)
    base = zoo[np.arange(n) % len(zoo)]
    noise = rng.standard_normal(base.shape) * (level * zoo_median / np.sqrt(zoo.shape[1]))
    return (base + noise).astype(np.float32)


def layer_noise_baseline(zoo: np.ndarray, layout: WeightLayout, sigma: float, n: int, seed: int) -> np.ndarray:
    """Zoo models plus Gaussian noise whose std in each tensor is ``sigma`` x that tensor's RMS in the model."""
    rng = np.random.default_rng(seed)
    out = zoo[np.arange(n) % len(zoo)].astype(np.float32, copy=True)
    for e in layout.entries:
        block = out[:, e.offset:e.offset + e.numel]
        rms = np.sqrt((block.astype(np.float64) ** 2).mean(axis=1, keepdims=True))
        block += rng.standard_normal(block.shape, dtype=np.float32) * (sigma * rms).astype(np.float32)
    return out


def average_baseline(zoo: np.ndarray, k: int, n: int, seed: int) -> np.ndarray:
    """Means of ``k`` distinct random zoo models (k is capped at the zoo's size)."""
    rng = np.random.default_rng(seed)
    k = min(k, len(zoo))
    return np.stack([zoo[rng.choice(len(zoo), size=k, replace=False)].mean(axis=0) for _ in range(n)]).astype(np.float32)


def interpolation_baseline(zoo: np.ndarray, weight: float, n: int, seed: int) -> np.ndarray:
    """(1 - w) a + w b for random pairs of distinct aligned zoo models."""
    rng = np.random.default_rng(seed)
    i = rng.integers(len(zoo), size=n)
    j = (i + rng.integers(1, len(zoo), size=n)) % len(zoo)
    return ((1 - weight) * zoo[i] + weight * zoo[j]).astype(np.float32)


def gaussian_baseline(zoo: np.ndarray, scale: float, n: int, seed: int) -> np.ndarray:
    """Independent draws per coordinate from N(zoo mean, (scale x zoo std)^2)."""
    rng = np.random.default_rng(seed)
    mean, std = zoo.mean(axis=0, dtype=np.float64), zoo.std(axis=0, dtype=np.float64)
    out = rng.standard_normal((n, zoo.shape[1]), dtype=np.float32)
    out *= (scale * std).astype(np.float32)
    out += mean.astype(np.float32)
    return out


@dataclass(frozen=True)
class BaselineSet:
    key: str                       # unique name of the set (report and metrics.json)
    method: str                    # the baseline's curve
    setting: str                   # its strength, as shown
    build: Callable[[np.ndarray], np.ndarray]   # the zoo -> the flat models, built when the set is scored


def baseline_sets(n_models: int, layout: WeightLayout, eval_cfg: EvalConfig, zoo_median: float) -> Iterator[BaselineSet]:
    """Every baseline at every configured strength for a zoo of ``n_models``; each set is built from the zoo
    only when it is scored (in a Ray task by the eval stage: the driver never holds a set)."""
    n, seed = eval_cfg.n_baseline, eval_cfg.seed
    for lvl in eval_cfg.noise_levels:
        yield BaselineSet(f"noise_{lvl:g}", "noise", f"{lvl:g} x NN dist",
                          lambda zoo, lvl=lvl: noise_baseline(zoo, lvl, zoo_median, n, seed))
    for sigma in eval_cfg.layer_noise_levels:
        yield BaselineSet(f"layer_noise_{sigma:g}", "layer noise", f"{sigma:g} x layer RMS",
                          lambda zoo, sigma=sigma: layer_noise_baseline(zoo, layout, sigma, n, seed))
    for k in sorted({min(k, n_models) for k in eval_cfg.average_ks}):
        yield BaselineSet(f"average_{k}", "average", f"k={k}", lambda zoo, k=k: average_baseline(zoo, k, n, seed))
    for w in eval_cfg.mix_weights:
        yield BaselineSet(f"mix_{w:g}", "interpolation", f"w={w:g}",
                          lambda zoo, w=w: interpolation_baseline(zoo, w, n, seed))
    for scale in eval_cfg.gaussian_scales:
        yield BaselineSet(f"gaussian_{scale:g}", "gaussian", f"{scale:g} x zoo std",
                          lambda zoo, scale=scale: gaussian_baseline(zoo, scale, n, seed))
