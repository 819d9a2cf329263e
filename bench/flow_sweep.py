"""Sweep flow settings on a finished run's canonical zoo and PCA, in one process (no Ray).

For every combination of the grids it trains the flow (the same FlowTrainer as the Ray Train loop),
samples at several temperatures and prints mean test accuracy and functional novelty beside the best of the
baselines (eval/baselines.py) interpolated to the same functional novelty, and the difference.

    python bench/flow_sweep.py runs/digits-mlp --grid flow.source_std=0.1,0.3,1.0 --grid flow.steps=4000,16000 \
        --temperatures 0.7,1.0,1.2
    python bench/flow_sweep.py runs/digits-mlp --run-flow --temperatures 0.1,0.2,0.3,0.5   # the run's own flow
"""
from __future__ import annotations

import argparse
import itertools

import torch

from dwf_ray.analysis.zoo_scorer import open_run
from dwf_ray.flow.checkpoint import LatentScaler
from dwf_ray.flow.trainer import train_in_process
from dwf_ray.sample.generator import Decoder, Generator


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", help="a run root whose canon and pca stages are complete")
    ap.add_argument("--grid", action="append", default=[], help="section.key=v1,v2,... (repeatable)")
    ap.add_argument("--temperatures", default="0.7,1.0,1.2,1.5")
    ap.add_argument("--n", type=int, default=100, help="models generated per temperature")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--run-flow", action="store_true", help="sample the run's own trained flow (no --grid)")
    args = ap.parse_args()
    if args.run_flow and args.grid:
        ap.error("--run-flow samples the flow the run trained: give no --grid")
    torch.set_num_threads(args.threads)

    pipe, pca, z, scorer = open_run(args.root, args.n)

    keys = [g.split("=", 1)[0] for g in args.grid]
    values = [g.split("=", 1)[1].split(",") for g in args.grid]
    temps = [float(t) for t in args.temperatures.split(",")]
    print(f"zoo mean test accuracy {scorer.zoo_acc:.2f} %, zoo median disagreement with its nearest other zoo "
          f"model {scorer.unit:.4f}")
    print("| setting | T | acc % | functional novelty | spread | best baseline at equal novelty % | delta pp | train s |")
    print("|---|---|---|---|---|---|---|---|")
    def report(setting: str, gen: Generator, sample_cfg, seconds: float) -> None:
        for temp in temps:
            acc, nov, spread = scorer(gen(args.n, temp, sample_cfg.seed, sample_cfg.solver, sample_cfg.steps))
            base = scorer.baselines_at(nov)
            best = max(base, key=base.get)
            print(f"| {setting} | {temp:g} | {acc:.2f} | {nov:.3f} | {spread:.2f} | {base[best]:.2f} ({best}) | "
                  f"{acc - base[best]:+.2f} | {seconds:.0f} |", flush=True)

    if args.run_flow:
        report("the run's flow", Generator.load(args.root), pipe.cfg.sample, 0)
        return
    for combo in itertools.product(*values) if values else [()]:
        overrides = [f"{k}={v}" for k, v in zip(keys, combo)]
        cfg = pipe.cfg.with_overrides(overrides)
        fc = cfg.flow
        scaler = LatentScaler.fit(z, fc.scaling)
        trainer, info = train_in_process(scaler.transform(z), fc)
        report(" ".join(overrides) or "run config", Generator(trainer.ema, fc, [Decoder(scaler, pca, pipe.arch)]),
               cfg.sample, info["seconds"])

if __name__ == "__main__":
    main()
