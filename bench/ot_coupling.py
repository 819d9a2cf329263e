"""Does minibatch optimal-transport coupling give better models at fewer sampling steps?

On a finished run's canonical zoo and PCA latents (single process, the FlowTrainer of the Ray Train loop),
trains the flow with independent and with OT-coupled source/target pairs (same seed, same steps), samples
with each solver at several step counts from the same source noise and prints, per (coupling, solver, steps):
mean test accuracy, functional novelty, the best baseline at equal functional novelty, and the solver error:
median distance of the latents to the same coupling's RK4 100-step latents, in units of the zoo's median
nearest-neighbour distance (PCA is orthonormal: latent distance = weight distance). Writes
bench/results/ot_coupling_<train steps>.{json,png}.

    python bench/ot_coupling.py runs/digits-mlp --train-steps 8000 --steps 2,4,8,16,32,100 --solvers euler,rk4
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch

from dwf_ray.analysis.zoo_scorer import open_run
from dwf_ray.eval.diversity import zoo_nn_median
from dwf_ray.flow.checkpoint import LatentScaler
from dwf_ray.flow.trainer import train_in_process
from dwf_ray.sample.generator import Decoder, Generator

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for (coupling, solver), style in zip(sorted({(r["coupling"], r["solver"]) for r in rows}), ("o-", "s--", "o-", "s--")):
        pts = sorted((r for r in rows if (r["coupling"], r["solver"]) == (coupling, solver)), key=lambda r: r["steps"])
        color = "tab:red" if coupling == "ot" else "tab:blue"
        for ax, key in zip(axes, ("acc", "novelty", "solver_error")):
            values = [p[key] if p[key] > 0 else np.nan for p in pts]     # the reference itself has no error
            ax.plot([p["steps"] for p in pts], values, style, color=color, label=f"{coupling}, {solver}")
    for ax, label in zip(axes, ("mean test accuracy %", "functional novelty", "solver error (zoo NN distances)")):
        ax.set_xscale("log")
        ax.set_xlabel("sampling steps")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[2].set_yscale("log")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", help="a run root whose canon and pca stages are complete")
    ap.add_argument("--train-steps", type=int, default=8000)
    ap.add_argument("--steps", default="2,4,8,16,32,100", help="sampling step counts")
    ap.add_argument("--solvers", default="euler,rk4")
    ap.add_argument("--n", type=int, default=100, help="models generated per setting")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seeds", default="0", help="flow training seeds (results averaged)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    pipe, pca, z, scorer = open_run(args.root, args.n)
    direct_unit = zoo_nn_median(scorer.zoo)
    steps_list, solvers = [int(s) for s in args.steps.split(",")], args.solvers.split(",")
    print(f"zoo mean test accuracy {scorer.zoo_acc:.2f} %; flow trained {args.train_steps} steps; "
          f"{args.n} models per row; T={args.temperature:g}")
    print("| coupling | solver | steps | acc % | novelty | solver error | best baseline % | delta pp |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for coupling in ("independent", "ot"):
        per_seed = []
        for seed in (int(s) for s in args.seeds.split(",")):
            fc = pipe.cfg.flow.model_copy(update={"ot_coupling": coupling == "ot", "steps": args.train_steps,
                                                  "seed": seed})
            scaler = LatentScaler.fit(z, fc.scaling)
            trainer, info = train_in_process(scaler.transform(z), fc)

            gen = Generator(trainer.ema, fc, [Decoder(scaler, pca, pipe.arch)])

            def latents(solver: str, steps: int) -> np.ndarray:
                return gen.latents(args.n, args.temperature, pipe.cfg.sample.seed, solver, steps)
            reference = latents("rk4", 100)
            for solver in solvers:
                for steps in steps_list:
                    lat = latents(solver, steps)
                    acc, nov, _ = scorer(pca.decode(lat))
                    err = float(np.median(np.linalg.norm(lat - reference, axis=1)) / direct_unit)
                    per_seed.append({"solver": solver, "steps": steps, "acc": acc, "novelty": nov, "solver_error": err,
                                     "train_seconds": info["seconds"]})
        for solver in solvers:
            for steps in steps_list:
                sel = [r for r in per_seed if (r["solver"], r["steps"]) == (solver, steps)]
                row = {"coupling": coupling, "solver": solver, "steps": steps, "n_seeds": len(sel),
                       **{k: float(np.mean([r[k] for r in sel])) for k in ("acc", "novelty", "solver_error",
                                                                             "train_seconds")}}
                row["best_baseline"] = max(scorer.baselines_at(row["novelty"]).values())
                rows.append(row)
                print(f"| {coupling} | {solver} | {steps} | {row['acc']:.2f} | {row['novelty']:.3f} | "
                      f"{row['solver_error']:.4f} | {row['best_baseline']:.2f} | "
                      f"{row['acc'] - row['best_baseline']:+.2f} |", flush=True)
    os.makedirs(RESULTS, exist_ok=True)
    stem = os.path.join(RESULTS, f"ot_coupling_{args.train_steps}")
    with open(stem + ".json", "w") as f:
        json.dump({"root": pipe.store.root, "zoo_acc": scorer.zoo_acc, "train_steps": args.train_steps,
                   "n": args.n, "temperature": args.temperature, "rows": rows}, f, indent=1)
    plot(rows, stem + ".png")
    print(f"wrote {stem}.json and {stem}.png")

if __name__ == "__main__":
    main()
