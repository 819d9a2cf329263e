"""Scoring sets of flat models of a finished run's canonical zoo as the report does, with eval's own judge (for
the benchmarks that sweep flows and solvers)."""
from __future__ import annotations

import numpy as np

from dwf_ray.canon.job import load_canonical
from dwf_ray.eval.baselines import baseline_sets
from dwf_ray.eval.diversity import zoo_nn_median
from dwf_ray.eval.judge import ZooJudge
from dwf_ray.eval.metrics import NOVELTY, point
from dwf_ray.eval.tradeoff import baseline_at
from dwf_ray.pca.model import PCAModel
from dwf_ray.pipeline import Pipeline
from dwf_ray.runtime import ensure_ray
from dwf_ray.weights import WeightLayout


class ZooScorer:
    """Scores sets of flat models against a run root's canonical zoo as the report does (eval's ``ZooJudge``,
    without the weight-space diagnostic): mean test accuracy and functional novelty, and every baseline (at the
    run's strengths) at equal novelty."""

    def __init__(self, pipe: Pipeline, n_baseline: int = 100):
        ensure_ray()
        _, self.zoo = load_canonical(pipe.cfg, pipe.store)
        self.layout = WeightLayout.from_arch(pipe.arch)
        self.eval_cfg = pipe.cfg.eval.model_copy(update={"n_baseline": n_baseline, "weight_novelty": False})
        self.judge = ZooJudge(pipe.arch, pipe.cfg.model_copy(update={"eval": self.eval_cfg}), self.zoo)
        zoo = self.judge.result
        self.unit, self.zoo_acc = float(np.median(zoo.disagreement)), float(zoo.acc.mean() * 100)
        self.direct_unit = zoo_nn_median(self.zoo)
        self._points = None

    def __call__(self, flat: np.ndarray) -> tuple[float, float, float]:
        """(mean test accuracy %, functional novelty, spread: the set's own median NN distance in weights over
        the zoo's)."""
        result = self.judge(flat)
        novelty = point("", "", "", result, self.judge.result)[NOVELTY]
        return float(result.acc.mean() * 100), novelty, zoo_nn_median(flat) / self.direct_unit

    def baselines_at(self, novelty: float) -> dict[str, float]:
        """Each baseline's accuracy % interpolated to functional ``novelty``; measured on first use."""
        if self._points is None:
            self._points = [{"method": b.method, "acc": acc, NOVELTY: nov} for b in
                            baseline_sets(len(self.zoo), self.layout, self.eval_cfg, self.direct_unit)
                            for acc, nov, _ in [self(b.build(self.zoo))]]
        methods = dict.fromkeys(p["method"] for p in self._points)
        return {m: baseline_at(self._points, m, novelty) for m in methods}


def open_run(root: str, n_baseline: int) -> tuple[Pipeline, PCAModel, np.ndarray, ZooScorer]:
    """A finished run root: its pipeline, PCA model, training latents and a scorer of its zoo."""
    pipe = Pipeline(root)
    pca_dir = pipe.store.uri("pca")
    return pipe, PCAModel.load(pca_dir), PCAModel.load_latents(pca_dir), ZooScorer(pipe, n_baseline)
