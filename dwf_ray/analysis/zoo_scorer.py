"""Scoring sets of flat models of a finished run's canonical zoo in one process, as the report does (for the
benchmarks that sweep flows and solvers)."""
from __future__ import annotations

import numpy as np

from dwf_ray.canon.job import load_canonical
from dwf_ray.config import EvalConfig
from dwf_ray.eval.diversity import candidates, interpolation_baseline, matched_nearest, noise_baseline, zoo_nn_median
from dwf_ray.eval.run import baseline_at
from dwf_ray.eval.scoring import score_flat
from dwf_ray.pca.shards import PCAModel
from dwf_ray.pipeline import Pipeline


class ZooScorer:
    """Scores sets of flat models of a run root's canonical zoo in this process, as the report does:
    mean test accuracy, novelty ratio (distances up to permutation) and the baselines at equal novelty."""

    def __init__(self, pipe: Pipeline, n_baseline: int = 100):
        self.arch_json, self.zoo_json = pipe.arch.to_json(), pipe.cfg.zoo.model_dump_json()
        _, self.zoo = load_canonical(pipe.cfg, pipe.store)
        self.ec = EvalConfig(bn_recal_batches=pipe.cfg.eval.bn_recal_batches)
        _, _, self.zoo_logits = score_flat(self.arch_json, self.zoo_json, self.ec.model_dump_json(), self.zoo)
        zoo_dist, _ = matched_nearest(self.arch_json, self.zoo, self.zoo, candidates(
            self.zoo, self.zoo, self.zoo_logits, self.zoo_logits, exclude_self=True))
        self.unit = float(np.median(zoo_dist))
        self.zoo_acc = self(self.zoo)[0]
        self.n_baseline, self._points = n_baseline, None

    def __call__(self, flat: np.ndarray) -> tuple[float, float, float]:
        """(mean test accuracy %, novelty ratio, spread), distances up to permutation as in the report."""
        acc, _, logits = score_flat(self.arch_json, self.zoo_json, self.ec.model_dump_json(), flat)
        dist, _ = matched_nearest(self.arch_json, self.zoo, flat, candidates(flat, self.zoo, logits, self.zoo_logits))
        return float(acc.mean() * 100), float(np.median(dist) / self.unit), zoo_nn_median(flat) / self.unit

    def baselines_at(self, novelty: float) -> tuple[float, float]:
        """(noise, interpolation) baseline accuracy % interpolated to ``novelty``; measured on first use."""
        if self._points is None:
            median, n, seed = zoo_nn_median(self.zoo), self.n_baseline, self.ec.seed
            self._points = [{"method": "noise", "acc": a, "novelty": v} for a, v, _ in (
                self(noise_baseline(self.zoo, lvl, median, n, seed)) for lvl in NOISE_LEVELS)]
            self._points += [{"method": "interpolation", "acc": a, "novelty": v} for a, v, _ in (
                self(interpolation_baseline(self.zoo, w, n, seed)) for w in MIX_WEIGHTS)]
        return baseline_at(self._points, "noise", novelty), baseline_at(self._points, "interpolation", novelty)


def open_run(root: str, n_baseline: int) -> tuple[Pipeline, PCAModel, np.ndarray, ZooScorer]:
    """A finished run root: its pipeline, PCA model, training latents and a scorer of its zoo."""
    pipe = Pipeline(root)
    pca_dir = pipe.store.uri("pca")
    return pipe, PCAModel.load(pca_dir), PCAModel.load_latents(pca_dir), ZooScorer(pipe, n_baseline)


NOISE_LEVELS = (0.05, 0.1, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)
MIX_WEIGHTS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5)
