"""Are aligned zoo models linearly connected? Weight matching against activation matching on a run's zoo.

Takes the zoo of a run root (its stage `zoo` complete), aligns models 1..P onto model 0 three ways: not at
all, weight matching (``canon.method=weights``) and activation matching (``canon.method=activations``, on
the training split), and reports for each the distance to model 0 relative to the distance before
alignment and the validation accuracy of the mixes (1 - w) model0 + w aligned, BatchNorm recalibrated on
the training split, against the end points' mean. The test split is not used.

Beside each mix it scores model 0 plus isotropic Gaussian noise of the same norm, w x |model0 - aligned|:
the two baselines of the report at equal distance. A generator whose samples lie in the span of the zoo
(as PCA latents do) moves along such mixes; where isotropic noise of the same size costs less accuracy
than the aligned path, it has little room to beat the noise baseline. The excitation column says why: the
output energy that the aligned difference causes in the Linear/Conv layers on training inputs, over that of
isotropic noise of the same norm (dwf_ray/analysis/excitation.py).

    python bench/canon_connectivity.py runs/digits-resnet [runs/digits-cnn ...] [--pairs 4] [--weights 0.25,0.5]

Writes bench/results/canon_connectivity-<run name>.json per run root, prints a table per root and plots every
root's best alignment (noise minus mix at equal distance) in bench/results/canon_connectivity.png.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from dwf_ray.archs import permutation_spec
from dwf_ray.canon.activations import ActivationMatcher
from dwf_ray.canon.matching import canonicalize, distance
from dwf_ray.data import dataset_for
from dwf_ray.accuracy import accuracy, recalibrate_batchnorm
from dwf_ray.eval.baselines import noise_baseline
from dwf_ray.analysis.excitation import excitation_ratio, input_moments
from dwf_ray.pipeline import Pipeline
from dwf_ray.weights import WeightLayout, load_model_state, to_module


def connectivity(root: str, pairs: int, weights: list[float], noise_draws: int) -> dict:
    """Every alignment method's distance ratio, excitation and mix/noise accuracies on one run's zoo."""
    pipe = Pipeline(root)
    arch, cfg = pipe.arch, pipe.cfg
    data = dataset_for(cfg.zoo)
    ok = pipe.store.manifest("zoo").query("status == 'ok'").sort_values("model_id")
    states = [load_model_state(u, arch)[0] for u in ok["uri"][:pairs + 1]]
    ref, others = states[0], states[1:]
    spec, layout = permutation_spec(arch), WeightLayout.from_arch(arch)
    names = layout.names

    def val_acc(state: dict) -> float:
        model = to_module(arch, state)
        recalibrate_batchnorm(model, data.train, cfg.eval.bn_recal_batches)
        return accuracy(model, data.val)

    ref_params = {k: ref[k] for k in names}
    aligners = {"none": lambda s: s,
                "weights": lambda s: canonicalize(spec, ref_params, s, residual=cfg.canon.residual)[0]}
    if not spec.attention:
        matcher = ActivationMatcher(arch, ref, data.train.x[:cfg.canon.activation_samples])
        aligners["activations"] = lambda s: matcher(s)[0]
    ref_flat = layout.flatten(ref_params)

    def noisy(dist: float, seed: int) -> list[dict]:
        """``noise_draws`` copies of model 0 plus isotropic noise of norm ``dist`` (the report's noise baseline)."""
        return [{**ref, **layout.unflatten(v)} for v in noise_baseline(ref_flat[None], 1.0, dist, noise_draws, seed)]

    moments = input_moments(arch, ref, data.train.x[:cfg.canon.activation_samples])
    rows = []
    for method, align in aligners.items():
        t0 = time.perf_counter()
        moved = [align(s) for s in others]
        seconds = (time.perf_counter() - t0) / len(others)
        dists = [distance(ref, m, names) for m in moved]
        row = {"method": method, "distance_ratio": float(np.mean(
            [d / distance(ref, s, names) for d, s in zip(dists, others)])),
            "seconds_per_model": seconds,
            "excitation": float(np.mean([excitation_ratio(moments, ref, m) for m in moved]))}
        for w in weights:
            row[f"acc_w{w:g}"] = float(np.mean([val_acc({k: (1 - w) * ref[k] + w * m[k] for k in ref}) for m in moved]))
            row[f"noise_w{w:g}"] = float(np.mean([val_acc(s) for i, d in enumerate(dists) for s in noisy(w * d, i)]))
        rows.append(row)
    return {"root": Path(root.rstrip("/")).name, "arch": json.loads(arch.to_json()), "pairs": len(others),
            "end_points_val_acc": float(np.mean([val_acc(s) for s in states])), "rows": rows}


def print_table(res: dict, weights: list[float]) -> None:
    print(f"{res['root']}: {res['arch']['family']} {res['arch']['args']}; {res['pairs']} pairs; "
          f"end points' mean val acc {res['end_points_val_acc'] * 100:.2f} %")
    print(f"| alignment | distance / unaligned | {' | '.join(f'val acc at w={w:g} % (noise %)' for w in weights)} "
          "| excitation | s/model |")
    print("|---|---|" + "---|" * len(weights) + "---|---|")
    for r in res["rows"]:
        accs = " | ".join(f"{r[f'acc_w{w:g}'] * 100:.2f} ({r[f'noise_w{w:g}'] * 100:.2f})" for w in weights)
        print(f"| {r['method']} | {r['distance_ratio']:.3f} | {accs} | {r['excitation']:.2f} | {r['seconds_per_model']:.2f} |")


def plot(results: list[dict], weights: list[float], path: Path) -> None:
    """Per zoo (its best alignment): accuracy of isotropic noise minus that of the aligned mix at equal distance."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(1.1 * len(results) + 3, 4))
    x, width = np.arange(len(results)), 0.8 / len(weights)
    best = [max((r for r in res["rows"] if r["method"] != "none"), key=lambda r: r[f"acc_w{weights[-1]:g}"])
            for res in results]
    for i, w in enumerate(weights):
        gaps = [(b[f"noise_w{w:g}"] - b[f"acc_w{w:g}"]) * 100 for b in best]
        ax.bar(x + (i - (len(weights) - 1) / 2) * width, gaps, width, label=f"w = {w:g}")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_xticks(x, [f"{res['root']}\n({b['method']})" for res, b in zip(results, best)], fontsize=7, rotation=20)
    ax.set_ylabel("noise acc - aligned-mix acc, points (symlog)")
    ax.set_title("> 0: isotropic noise costs less accuracy than the aligned path at equal distance", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("roots", nargs="+", help="run roots whose zoo stage is complete")
    ap.add_argument("--pairs", type=int, default=4, help="models 1..pairs are aligned onto model 0")
    ap.add_argument("--weights", default="0.25,0.5", help="mixing weights w of the aligned model")
    ap.add_argument("--noise-draws", type=int, default=2, help="noise vectors per pair and weight")
    ap.add_argument("--out", default="bench/results", help="folder of the JSON files and the plot")
    args = ap.parse_args()
    torch.set_num_threads(1)
    weights = [float(w) for w in args.weights.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for root in args.roots:
        res = connectivity(root, args.pairs, weights, args.noise_draws)
        print_table(res, weights)
        (out / f"canon_connectivity-{res['root']}.json").write_text(json.dumps(res, indent=2))
        results.append(res)
    plot(results, weights, out / "canon_connectivity.png")
    print(f"plot: {out / 'canon_connectivity.png'}")


if __name__ == "__main__":
    main()
