"""Does permuting the transformer residual stream too help canonicalization? (beyond the paper)

Trains a few tiny ViTs on the bundled digits (1x8x8 images, seeds 0..n-1), canonicalizes every model onto
model 0 three ways: not at all, TransFusion as in the paper (attention heads and MLP units), and TransFusion
with the residual stream permuted too (``canonicalize(..., residual=True)``). For each it reports the distance
to the reference relative to the distance before alignment, and the test accuracy of the midpoint
0.5 * (reference + aligned model) against the two end points' own accuracy (mean).

    python bench/canon_residual.py [--models 6] [--epochs 15] [--hidden 32]   (MLP width: 2 x hidden)

Writes bench/results/canon_residual.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from dwf_ray.archs import ArchSpec, build_model, permutation_spec
from dwf_ray.canon.matching import canonicalize, distance
from dwf_ray.config import ZooConfig
from dwf_ray.data import dataset_for
from dwf_ray.accuracy import accuracy
from dwf_ray.weights import to_module
from dwf_ray.zoo import train_classifier

ARGS = {"image_size": 8, "patch_size": 2, "num_layers": 2, "num_heads": 4, "num_classes": 10, "in_channels": 1}
MODES = {"none": None, "heads+mlp (paper)": False, "heads+mlp+residual": True}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=int, default=6)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--hidden", type=int, default=32, help="ViT width (4 heads)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench/results/canon_residual.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    arch = ArchSpec("vit", {**ARGS, "hidden_dim": args.hidden, "mlp_dim": 2 * args.hidden})
    cfg = ZooConfig(arch={"family": arch.family, "args": arch.args}, image=True, epochs=args.epochs)
    spec, test = permutation_spec(arch), dataset_for(cfg).test

    t0 = time.perf_counter()
    states = []
    for seed in range(args.models):
        torch.manual_seed(seed)
        model = train_classifier(build_model(arch), cfg, seed)
        states.append({k: v.detach().numpy().copy() for k, v in model.named_parameters()})
    print(f"trained {args.models} ViTs in {time.perf_counter() - t0:.0f} s")
    ref, names = states[0], list(states[0])
    own = [accuracy(to_module(arch, s), test) for s in states]

    rows = []
    for mode, residual in MODES.items():
        rel, mids, ends, secs = [], [], [], []
        for i, state in enumerate(states[1:], start=1):
            t = time.perf_counter()
            aligned = state if residual is None else canonicalize(spec, ref, state, residual=residual)[0]
            secs.append(time.perf_counter() - t)
            rel.append(distance(ref, aligned, names) / distance(ref, state, names))
            mids.append(accuracy(to_module(arch, {k: 0.5 * (ref[k] + aligned[k]) for k in names}), test))
            ends.append(0.5 * (own[0] + own[i]))
        rows.append({"mode": mode, "distance_after_over_before": float(np.mean(rel)),
                     "midpoint_test_acc": float(np.mean(mids)), "midpoint_test_acc_min": float(np.min(mids)),
                     "endpoints_test_acc": float(np.mean(ends)), "ms_per_model": 1000 * float(np.mean(secs))})

    print(f"{'alignment':22s} {'dist after/before':>17s} {'midpoint acc':>12s} {'(worst)':>8s} "
          f"{'end points acc':>14s} {'ms/model':>9s}")
    for r in rows:
        print(f"{r['mode']:22s} {r['distance_after_over_before']:17.3f} {r['midpoint_test_acc']:12.3f} "
              f"{r['midpoint_test_acc_min']:8.3f} {r['endpoints_test_acc']:14.3f} {r['ms_per_model']:9.0f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"arch": cfg.arch, "epochs": args.epochs, "models": args.models,
                                          "own_test_acc": own, "results": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
