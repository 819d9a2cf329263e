"""The trade-off statistics: each baseline's accuracy interpolated to a generated set's functional novelty, the
margin over the best of them with its standard error, and whether an operating point is accepted."""
from __future__ import annotations

import numpy as np

from dwf_ray.eval.metrics import NOVELTY

GENERATOR = "generator"     # the method of the generated sets (baselines are every other method)


def baseline_at(points: list[dict], method: str, x: float, field: str = "acc", axis: str = NOVELTY) -> float:
    """A curve's ``field`` (accuracy, or its standard error ``se``) linearly interpolated to ``axis`` = ``x``
    (clamped at its measured ends)."""
    pts = sorted((p[axis], p[field]) for p in points if p["method"] == method)
    return float(np.interp(x, [p[0] for p in pts], [p[1] for p in pts]))


def add_margins(points: list[dict], axis: str = NOVELTY) -> None:
    """Each generator point gets every baseline's accuracy at its novelty (``baselines_at``), ``margin`` over
    the best of them (``best_baseline``), and ``margin_se``: the standard error of that difference (both means'
    standard errors, the baseline's interpolated like its accuracy)."""
    methods = list(dict.fromkeys(p["method"] for p in points if not p["method"].startswith(GENERATOR)))
    for p in points:
        if p["method"].startswith(GENERATOR) and methods:
            accs = {m: baseline_at(points, m, p[axis], axis=axis) for m in methods}
            best = max(accs, key=accs.get)
            p["baselines_at"] = accs
            p["best_baseline"] = best
            p["margin"] = p["acc"] - accs[best]
            p["margin_se"] = float(np.hypot(p["se"], baseline_at(points, best, p[axis], "se", axis)))


def accepted(p: dict, min_novelty: float) -> bool:
    """An operating point passes when it is novel enough in function space and beats the best baseline at
    equal functional novelty by more than one standard error."""
    return bool(p[NOVELTY] >= min_novelty and p.get("margin", -np.inf) > p.get("margin_se", np.inf))
