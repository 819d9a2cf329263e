"""Sweep flow settings on a finished run's canonical zoo and PCA, in one process (no Ray).

For every combination of the grids it trains the flow (the same FlowTrainer as the Ray Train loop),
samples at several temperatures and prints mean test accuracy and novelty beside the two baselines
(noise-perturbed and interpolated zoo models) interpolated to the same novelty, and the difference.

    python bench/flow_sweep.py runs/digits-mlp --grid flow.source_std=0.1,0.3,1.0 --grid flow.steps=4000,16000 \
        --temperatures 0.7,1.0,1.2
"""
from __future__ import annotations

import argparse
import itertools

import numpy as np
import torch

from dwf_ray.config import EvalConfig
from dwf_ray.eval.diversity import candidates, interpolation_baseline, matched_nearest, noise_baseline, zoo_nn_median
from dwf_ray.eval.run import baseline_at
from dwf_ray.eval.scoring import score_flat
from dwf_ray.flow.sample import sample_latents
from dwf_ray.flow.train import LatentScaler, train_in_process
from dwf_ray.pca.shards import PCAModel
from dwf_ray.pipeline import Pipeline


class ZooScorer:
    """Scores sets of flat models of a run root's canonical zoo in this process, as the report does:
    mean test accuracy, novelty ratio (distances up to permutation) and the baselines at equal novelty."""

    def __init__(self, pipe: Pipeline, n_baseline: int = 100):
        self.arch_json, self.zoo_json = pipe.arch.to_json(), pipe.cfg.zoo.model_dump_json()
        _, self.zoo = pipe.canonical_models()
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", help="a run root whose canon and pca stages are complete")
    ap.add_argument("--grid", action="append", default=[], help="section.key=v1,v2,... (repeatable)")
    ap.add_argument("--temperatures", default="0.7,1.0,1.2,1.5")
    ap.add_argument("--n", type=int, default=100, help="models generated per temperature")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    pipe, pca, z, scorer = open_run(args.root, args.n)

    keys = [g.split("=", 1)[0] for g in args.grid]
    values = [g.split("=", 1)[1].split(",") for g in args.grid]
    temps = [float(t) for t in args.temperatures.split(",")]
    print(f"zoo mean test accuracy {scorer.zoo_acc:.2f} %, zoo median NN distance {scorer.unit:.4f} (up to permutation)")
    print("| setting | T | acc % | novelty | spread | noise % | interp % | delta pp | train s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for combo in itertools.product(*values) if values else [()]:
        overrides = [f"{k}={v}" for k, v in zip(keys, combo)]
        cfg = pipe.cfg.with_overrides(overrides)
        fc = cfg.flow
        scaler = LatentScaler.fit(z, fc.scaling)
        trainer, info = train_in_process(scaler.transform(z), fc)
        for temp in temps:
            lat = sample_latents(trainer.ema, scaler, args.n, fc.source_std, temp, cfg.sample.solver,
                                 cfg.sample.steps, cfg.sample.seed, fc.source)
            acc, nov, spread = scorer(pca.decode(lat))
            noise_acc, interp_acc = scorer.baselines_at(nov)
            print(f"| {' '.join(overrides) or 'run config'} | {temp:g} | {acc:.2f} | {nov:.3f} | {spread:.2f} | "
                  f"{noise_acc:.2f} | {interp_acc:.2f} | {acc - max(noise_acc, interp_acc):+.2f} | "
                  f"{info['seconds']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
