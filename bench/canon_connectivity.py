"""Are aligned zoo models linearly connected? Weight matching against activation matching on a run's zoo.

Takes the zoo of a run root (its stage `zoo` complete), aligns models 1..P onto model 0 three ways: not at
all, weight matching (``canon.method=weights``) and activation matching (``canon.method=activations``, on
the training split), and reports for each the distance to model 0 relative to the distance before
alignment and the validation accuracy of the mixes (1 - w) model0 + w aligned, BatchNorm recalibrated on
the training split, against the end points' mean. The test split is not used.

    python bench/canon_connectivity.py runs/digits-resnet [--pairs 4] [--weights 0.25,0.5]

Writes bench/results/canon_connectivity-<run name>.json and prints a table.
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
from dwf_ray.eval.accuracy import accuracy, recalibrate_batchnorm
from dwf_ray.pipeline import Pipeline
from dwf_ray.weights import WeightLayout, load_model_state, to_module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", help="a run root whose zoo stage is complete")
    ap.add_argument("--pairs", type=int, default=4, help="models 1..pairs are aligned onto model 0")
    ap.add_argument("--weights", default="0.25,0.5", help="mixing weights w of the aligned model")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    pipe = Pipeline(args.root)
    arch, cfg = pipe.arch, pipe.cfg
    data = dataset_for(cfg.zoo)
    ok = pipe.manifest("zoo").query("status == 'ok'").sort_values("model_id")
    states = [load_model_state(u, arch)[0] for u in ok["uri"][:args.pairs + 1]]
    ref, others = states[0], states[1:]
    spec, names = permutation_spec(arch), WeightLayout.from_arch(arch).names
    weights = [float(w) for w in args.weights.split(",")]

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
    ends = float(np.mean([val_acc(s) for s in states]))
    rows = []
    for method, align in aligners.items():
        t0 = time.perf_counter()
        moved = [align(s) for s in others]
        seconds = (time.perf_counter() - t0) / len(others)
        row = {"method": method, "distance_ratio": float(np.mean(
            [distance(ref, m, names) / distance(ref, s, names) for m, s in zip(moved, others)])),
            "seconds_per_model": seconds}
        for w in weights:
            row[f"acc_w{w:g}"] = float(np.mean([val_acc({k: (1 - w) * ref[k] + w * m[k] for k in ref}) for m in moved]))
        rows.append(row)

    print(f"{args.root}: {arch.family} {arch.args}; {len(others)} pairs; end points' mean val acc {ends * 100:.2f} %")
    print(f"| alignment | distance / unaligned | {' | '.join(f'val acc at w={w:g} %' for w in weights)} | s/model |")
    print("|---|---|" + "---|" * len(weights) + "---|")
    for r in rows:
        accs = " | ".join(f"{r[f'acc_w{w:g}'] * 100:.2f}" for w in weights)
        print(f"| {r['method']} | {r['distance_ratio']:.3f} | {accs} | {r['seconds_per_model']:.2f} |")
    out = Path(args.out or f"bench/results/canon_connectivity-{Path(args.root.rstrip('/')).name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"root": Path(args.root).name, "arch": json.loads(arch.to_json()), "pairs": len(others),
                               "end_points_val_acc": ends, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
