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
import time

import numpy as np
import torch

from dwf_ray.config import EvalConfig
from dwf_ray.eval.diversity import candidates, interpolation_baseline, matched_nearest, noise_baseline, zoo_nn_median
from dwf_ray.eval.run import baseline_at
from dwf_ray.eval.scoring import score_flat
from dwf_ray.flow.sample import sample_latents
from dwf_ray.flow.train import FlowTrainer, LatentScaler, noise_generator, selectable, split_holdout
from dwf_ray.pca.shards import PCAModel
from dwf_ray.pipeline import Pipeline


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", help="a run root whose canon and pca stages are complete")
    ap.add_argument("--grid", action="append", default=[], help="section.key=v1,v2,... (repeatable)")
    ap.add_argument("--temperatures", default="0.7,1.0,1.2,1.5")
    ap.add_argument("--n", type=int, default=100, help="models generated per temperature")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    pipe = Pipeline(args.root)
    arch_json = pipe.arch.to_json()
    _, zoo = pipe.canonical_models()
    pca_dir = pipe.store.uri("pca")
    pca, z = PCAModel.load(pca_dir), PCAModel.load_latents(pca_dir)
    zoo_json = pipe.cfg.zoo.model_dump_json()
    ec = EvalConfig(bn_recal_batches=pipe.cfg.eval.bn_recal_batches)
    median = zoo_nn_median(zoo)

    _, _, zoo_logits = score_flat(arch_json, zoo_json, ec.model_dump_json(), zoo)
    zoo_dist, _ = matched_nearest(arch_json, zoo, zoo, candidates(zoo, zoo, zoo_logits, zoo_logits, exclude_self=True))
    unit = float(np.median(zoo_dist))

    def score(flat: np.ndarray) -> tuple[float, float, float]:
        """(mean test accuracy %, novelty ratio, spread), distances up to permutation as in the report."""
        acc, _, logits = score_flat(arch_json, zoo_json, ec.model_dump_json(), flat)
        dist, _ = matched_nearest(arch_json, zoo, flat, candidates(flat, zoo, logits, zoo_logits))
        return float(acc.mean() * 100), float(np.median(dist) / unit), zoo_nn_median(flat) / unit

    zoo_acc = score(zoo)[0]
    points = []
    for lvl in (0.05, 0.1, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0):
        acc, nov, _ = score(noise_baseline(zoo, lvl, median, args.n, ec.seed))
        points.append({"method": "noise", "acc": acc, "novelty": nov})
    for w in (0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5):
        acc, nov, _ = score(interpolation_baseline(zoo, w, args.n, ec.seed))
        points.append({"method": "interpolation", "acc": acc, "novelty": nov})

    keys = [g.split("=", 1)[0] for g in args.grid]
    values = [g.split("=", 1)[1].split(",") for g in args.grid]
    temps = [float(t) for t in args.temperatures.split(",")]
    print(f"zoo mean test accuracy {zoo_acc:.2f} %, zoo median NN distance {unit:.4f} (up to permutation)")
    print("| setting | T | acc % | novelty | spread | noise % | interp % | delta pp | train s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for combo in itertools.product(*values) if values else [()]:
        overrides = [f"{k}={v}" for k, v in zip(keys, combo)]
        cfg = pipe.cfg.with_overrides(overrides)
        fc = cfg.flow
        scaler = LatentScaler.fit(z, fc.scaling)
        u = torch.tensor(scaler.transform(z), dtype=torch.float32)
        u_train, u_hold = split_holdout(u, fc.holdout_fraction, fc.seed)
        trainer = FlowTrainer(fc, u.shape[1])
        g = noise_generator(fc.seed)
        best, best_state, t0 = np.inf, None, time.perf_counter()
        for step in range(fc.steps):
            trainer.step(u_train[torch.randint(len(u_train), (fc.batch_size,), generator=g)], g)
            if ((step + 1) % fc.eval_every == 0 or step + 1 == fc.steps) and selectable(fc, step + 1):
                loss = trainer.heldout(u_hold)
                if loss < best:
                    best, best_state = loss, {k: v.clone() for k, v in trainer.ema.state_dict().items()}
        seconds = time.perf_counter() - t0
        trainer.ema.load_state_dict(best_state)
        for temp in temps:
            lat = sample_latents(trainer.ema, scaler, args.n, fc.source_std, temp, cfg.sample.solver,
                                 cfg.sample.steps, cfg.sample.seed)
            acc, nov, spread = score(pca.decode(lat))
            noise_acc, interp_acc = baseline_at(points, "noise", nov), baseline_at(points, "interpolation", nov)
            print(f"| {' '.join(overrides) or 'run config'} | {temp:g} | {acc:.2f} | {nov:.3f} | {spread:.2f} | "
                  f"{noise_acc:.2f} | {interp_acc:.2f} | {acc - max(noise_acc, interp_acc):+.2f} | {seconds:.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
