"""The metrics of a scored set of models, as one registry: a new metric is one function and one entry; the
trade-off table, metrics.json and the plots render from it.

Each metric reads a set's per-model results and the zoo's (every zoo model measured against the rest of
the zoo, itself left out).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np


@dataclass
class SetResult:
    """Per-model results of one scored set (nothing else is kept once a set is scored)."""
    acc: np.ndarray                     # test accuracy (fraction)
    disagreement: np.ndarray            # D: disagreement with the nearest zoo model in function space
    similarity: np.ndarray              # S: max IoU of wrong predictions with a zoo model
    nearest: np.ndarray                 # index of the zoo model nearest in function space
    weight_dist: np.ndarray | None = None   # diagnostic: distance to the nearest zoo model up to permutation
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    fmt: str
    of: Callable[[SetResult, SetResult], float | None]
    about: str


def _median_ratio(a: np.ndarray | None, b: np.ndarray | None) -> float | None:
    if a is None or b is None:
        return None
    unit = float(np.median(b))
    return float(np.median(a) / unit) if unit > 0 else float("inf")


def _se(r: SetResult, zoo: SetResult) -> float:
    return float(r.acc.std(ddof=1) / np.sqrt(len(r.acc)) * 100) if len(r.acc) > 1 else 0.0


METRICS: tuple[Metric, ...] = (
    Metric("acc", "mean acc %", "{:.2f}", lambda r, zoo: float(r.acc.mean() * 100), "mean test accuracy"),
    Metric("se", "SE", "{:.2f}", _se, "standard error of the mean accuracy"),
    Metric("func_novelty", "functional novelty", "{:.3f}",
           lambda r, zoo: _median_ratio(r.disagreement, zoo.disagreement),
           "median D over the zoo's own median D (1.0: as different as one more training run; copies: 0)"),
    Metric("similarity", "S (max wrong IoU)", "{:.3f}", lambda r, zoo: float(np.median(r.similarity)),
           "median over models of the max IoU of wrong predictions with a zoo model (lower: more novel)"),
    Metric("weight_novelty", "weight novelty", "{:.3f}", lambda r, zoo: _median_ratio(r.weight_dist, zoo.weight_dist),
           "diagnostic: median distance to the nearest zoo model up to permutation over the zoo's own"),
    Metric("distinct_nearest", "distinct NN", "{:.0f}", lambda r, zoo: float(len(np.unique(r.nearest))),
           "zoo models that are the functional nearest of some model"),
)
NOVELTY = "func_novelty"     # the axis every comparison is made on


def point(key: str, method: str, setting: str, r: SetResult, zoo: SetResult) -> dict:
    """One row of the trade-off: the set's name, curve and strength, and every metric."""
    return {"key": key, "method": method, "setting": setting, **{m.key: m.of(r, zoo) for m in METRICS}}


def fmt(metric_key: str, value) -> str:
    m = next(m for m in METRICS if m.key == metric_key)
    return "-" if value is None else m.fmt.format(value)
