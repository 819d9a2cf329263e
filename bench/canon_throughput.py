"""Throughput of the canonicalization job (Ray Data + actor pool) with 1 and 2 actors, and its correctness.

The zoo: one trained digits MLP (64-32-32-10, other widths with --hidden) as the reference (model m00000), and
N-1 copies of it, each with small Gaussian noise added and then randomly permuted. The canonical form of copy i
is therefore known exactly (the reference plus copy i's noise, unpermuted): a copy counts as undone when the
job's output equals it.

    python bench/canon_throughput.py [--n 2000] [--hidden 32,32] [--batch-size 16] [--root DIR_OR_S3_PREFIX]

Times: wall-clock seconds of the whole job (actor start-up included), and seconds from the first output written
to the last (the running pool, without start-up). Scaling efficiency = t1 / (2 t2), for both. Also measured: what
a new actor process and its imports cost, and the whole-job efficiency that a perfectly scaling running part
would give with the start-up this run had (the ceiling that start-up sets).
Writes bench/results/canon_throughput.json and prints a table.
"""
from __future__ import annotations

import argparse
import importlib
import json
import tempfile
import time
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import ray
import torch

from dwf_ray import store
from dwf_ray.archs import ArchSpec, build_model, permutation_spec
from dwf_ray.canon.job import canonicalize_manifest
from dwf_ray.archs.perm_spec import apply_permutation, random_permutation
from dwf_ray.config import CanonConfig, ZooConfig
from dwf_ray.runtime import ensure_ray
from dwf_ray.weights import load_model_state, save_checkpoint
from dwf_ray.zoo import MANIFEST_COLUMNS, train_classifier

RESULTS = Path(__file__).parent / "results" / "canon_throughput.json"


def noisy_copy(ref: dict[str, np.ndarray], i: int, noise: float) -> dict[str, np.ndarray]:
    """The reference plus copy i's noise (``noise`` times each tensor's std), before it is permuted."""
    rng = np.random.default_rng(i)
    return {k: (v + noise * v.std() * rng.standard_normal(v.shape)).astype(np.float32) for k, v in ref.items()}


def make_zoo(folder: str, n: int, noise: float, epochs: int, hidden: list[int]) -> tuple[pd.DataFrame, dict, ArchSpec]:
    cfg = ZooConfig(epochs=epochs)
    cfg.arch["args"]["hidden"] = hidden
    arch = ArchSpec.parse(cfg.arch)
    torch.manual_seed(0)
    model = train_classifier(build_model(arch), cfg, seed=0)
    ref = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    spec = permutation_spec(arch)
    rows = []
    for i in range(n):
        state = ref if i == 0 else apply_permutation(spec, random_permutation(spec, ref, seed=i),
                                                     noisy_copy(ref, i, noise))
        row = dict.fromkeys(MANIFEST_COLUMNS)
        uri = store.join(folder, f"m{i:05d}.safetensors")
        row.update(model_id=f"m{i:05d}", uri=uri, arch=arch.to_json(), dataset="digits", seed=i, status="ok",
                   error="", sha256=save_checkpoint(uri, state, arch))
        rows.append(row)
    return pd.DataFrame(rows, columns=MANIFEST_COLUMNS), ref, arch


def undone(out: pd.DataFrame, ref: dict, arch: ArchSpec, noise: float) -> tuple[int, float]:
    """(copies whose output equals their unpermuted source, largest deviation from it)."""
    count, worst = 0, 0.0
    for _, row in out.iterrows():
        i = int(row["model_id"][1:])
        got, _ = load_model_state(row["canon_uri"], arch)
        want = ref if i == 0 else noisy_copy(ref, i, noise)
        err = max(float(np.abs(got[k] - want[k]).max()) for k in want)
        count += err < 1e-6
        worst = max(worst, err)
    return count, worst


def write_span(uris: list[str]) -> float:
    """Seconds from the first output written to the last: the job's time without actor start-up."""
    fs, _ = fsspec.core.url_to_fs(uris[0])
    times = [fs.modified(fsspec.core.url_to_fs(u)[1]).timestamp() for u in uris]
    return max(times) - min(times)


@ray.remote(num_cpus=1)
class _Probe:
    """A bare actor: how long a new actor process takes to answer, and to import a canonicalization actor's
    modules."""

    def ready(self) -> bool:
        return True

    def import_stage(self) -> float:
        t0 = time.perf_counter()
        for module in ("ray.data", "dwf_ray.canon.job"):     # torch comes with the stage
            importlib.import_module(module)
        return time.perf_counter() - t0


def actor_start_parts(repeats: int = 3) -> dict:
    """Median seconds of (a new actor process answering, that process importing Ray Data and the stage)."""
    new, imports = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        probe = _Probe.remote()
        ray.get(probe.ready.remote())
        new.append(time.perf_counter() - t0)
        imports.append(ray.get(probe.import_stage.remote()))
        ray.kill(probe)
    return {"new_actor_s": round(float(np.median(new)), 2), "import_s": round(float(np.median(imports)), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--noise", type=float, default=0.01, help="noise std relative to each tensor's std")
    ap.add_argument("--epochs", type=int, default=20, help="training epochs of the reference")
    ap.add_argument("--hidden", default="32,32", help="hidden widths of the digits MLP (the cost of one match)")
    ap.add_argument("--actor-cpus", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--root", default=None, help="folder or s3:// prefix for the zoo and outputs (default: temp)")
    args = ap.parse_args()

    ensure_ray()
    # start processing only once min_actors actors are up, so that the running span compares 1 and 2 actors
    ray.data.DataContext.get_current().wait_for_min_actors_s = 1800
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or tmp
        t0 = time.perf_counter()
        man, ref, arch = make_zoo(store.join(root, "zoo"), args.n, args.noise, args.epochs,
                                [int(h) for h in args.hidden.split(",")])
        print(f"zoo of {args.n} checkpoints written in {time.perf_counter() - t0:.1f} s")
        runs = []
        for actors in (1, 2):
            cfg = CanonConfig(min_actors=actors, max_actors=actors, actor_cpus=args.actor_cpus,
                              batch_size=args.batch_size)
            t0 = time.perf_counter()
            out = canonicalize_manifest(man, cfg, store.join(root, f"canonical_{actors}"))
            seconds = time.perf_counter() - t0
            ok = int((out["status"] == "ok").sum())
            n_undone, worst = undone(out[out["status"] == "ok"], ref, arch, args.noise)
            span = write_span(list(out["canon_uri"][out["status"] == "ok"]))
            runs.append({"actors": actors, "seconds": round(seconds, 2), "models_per_s": round(args.n / seconds, 1),
                         "write_span_s": round(span, 2), "models_per_s_running": round((ok - 1) / span, 1),
                         "ok": ok, "undone": n_undone, "max_deviation": worst})
            print(f"{actors} actor(s): {seconds:.1f} s ({span:.1f} s from first to last output), {ok} ok, "
                  f"{n_undone} undone")
        parts = actor_start_parts()
    efficiency = runs[0]["seconds"] / (2 * runs[1]["seconds"])
    running_efficiency = runs[0]["write_span_s"] / (2 * runs[1]["write_span_s"])
    # the whole job's efficiency had the 2-actor run's running part been exactly half the 1-actor run's
    start_up_2 = runs[1]["seconds"] - runs[1]["write_span_s"]
    perfect = runs[0]["seconds"] / (2 * (start_up_2 + runs[0]["write_span_s"] / 2))
    result = {"n": args.n, "noise": args.noise, "actor_cpus": args.actor_cpus, "batch_size": args.batch_size,
              "arch": arch.to_json(), "runs": runs, "scaling_efficiency": round(efficiency, 3),
              "scaling_efficiency_running": round(running_efficiency, 3),
              "scaling_efficiency_if_running_part_perfect": round(perfect, 3), "actor_start": parts}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print("\n| actors | job s | models/s | first-to-last output s | models/s running | ok | undone | max dev |")
    print("|---|---|---|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['actors']} | {r['seconds']:.1f} | {r['models_per_s']:.1f} | {r['write_span_s']:.1f} | "
              f"{r['models_per_s_running']:.1f} | {r['ok']}/{args.n} | {r['undone']}/{args.n} | "
              f"{r['max_deviation']:.1e} |")
    print(f"\nscaling efficiency t1 / (2 t2): whole job {efficiency:.2f}, without actor start-up "
          f"{running_efficiency:.2f}   (written to {RESULTS})")
    print(f"start-up before the first output: {runs[0]['seconds'] - runs[0]['write_span_s']:.1f} s (1 actor), "
          f"{start_up_2:.1f} s (2 actors), of which a new actor process {parts['new_actor_s']:.2f} s and its "
          f"imports (Ray Data, torch, the stage) {parts['import_s']:.2f} s; with that start-up, perfect scaling of "
          f"the running part would give {perfect:.2f} over the whole job")
    if any(r["undone"] != args.n for r in runs):
        raise SystemExit("some permutations were not undone")


if __name__ == "__main__":
    main()
