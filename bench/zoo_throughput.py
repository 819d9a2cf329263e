"""Zoo training throughput: models/s with one model per Ray task against lockstep chunks of M models per task
(``zoo.models_per_task``), in one run on one Ray, every setting training the same seeds of one preset's zoo.

    python bench/zoo_throughput.py [--preset mnist1d-mlp-scale] [--n 1024] [--n-alone 32] [--per-task 32,128,256]

M = 1 trains ``--n-alone`` models (it is slow), every other M trains ``--n``. Models/s is whole-job wall clock
(task start-up included); the ratio is against M = 1; ``minutes_for_10000`` extrapolates each rate. The zoos'
mean test accuracy is printed beside each setting (the same recipe must give the same models). The compute
ceiling bounds every M: the matmul FLOPs of one model's training (forward and backward of every step, counted by
torch's FlopCounterMode) at the GFLOP/s of a large single-thread matmul measured in the same run, on every CPU;
``ceiling_vs_one_per_task`` is the most any lockstep chunk could gain over M = 1 on this machine.
Writes bench/results/zoo_throughput_<preset>.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from dwf_ray.archs import build_model
from dwf_ray.data import dataset_for
from dwf_ray.presets import preset
from dwf_ray.runtime import cluster_cpus, ensure_ray
from dwf_ray.zoo import models_per_task, train_zoo

RESULTS = Path(__file__).parent / "results"


def timed_zoo(zoo_cfg, per_task: int, n: int) -> dict:
    cfg = zoo_cfg.model_copy(update={"n_models": n, "models_per_task": per_task})
    with tempfile.TemporaryDirectory(prefix="zoo-bench-") as out:
        t0 = time.perf_counter()
        man = train_zoo(cfg, out)
        seconds = time.perf_counter() - t0
    ok = man[man["status"] == "ok"]
    return {"models_per_task": per_task, "models": n, "ok": len(ok), "seconds": round(seconds, 2),
            "models_per_s": round(n / seconds, 3), "minutes_for_10000": round(10_000 / (n / seconds) / 60, 1),
            "test_acc_mean": round(float(ok["test_acc"].mean()), 4)}


def matmul_gflops(size: int = 1024, repeats: int = 20) -> float:
    """GFLOP/s of one thread on a large float32 matmul: what one core does at best."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    seconds = time.perf_counter() - t0
    torch.set_num_threads(threads)
    return 2 * size ** 3 * repeats / seconds / 1e9


def training_flops(zoo_cfg) -> tuple[float, int]:
    """(FLOPs of one training step of one model on one batch, steps per model)."""
    data = dataset_for(zoo_cfg)
    model = build_model(zoo_cfg.arch)
    x, y = data.train.x[:zoo_cfg.batch_size], data.train.y[:zoo_cfg.batch_size]
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    return counter.get_total_flops(), zoo_cfg.epochs * -(-len(data.train) // zoo_cfg.batch_size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="mnist1d-mlp-scale")
    ap.add_argument("--n", type=int, default=1024, help="models per lockstep setting")
    ap.add_argument("--n-alone", type=int, default=32, help="models with one model per task")
    ap.add_argument("--per-task", default="32,128,256", help="lockstep chunk sizes M to time")
    ap.add_argument("--epochs", type=int, default=None, help="override the preset's epochs (a quicker bench)")
    args = ap.parse_args()
    zoo_cfg = preset(args.preset).zoo
    if args.epochs:
        zoo_cfg = zoo_cfg.model_copy(update={"epochs": args.epochs})
    ensure_ray()
    rows = [timed_zoo(zoo_cfg, 1, args.n_alone)]
    for m in (int(v) for v in args.per_task.split(",")):
        models_per_task(zoo_cfg.model_copy(update={"models_per_task": m}), 1)   # a family that cannot: one line
        rows.append(timed_zoo(zoo_cfg, m, args.n))
        print(rows[-1], flush=True)
    best = max(rows[1:], key=lambda r: r["models_per_s"])
    flops_step, steps = training_flops(zoo_cfg)
    gflops = matmul_gflops()
    ceiling = cluster_cpus() * gflops * 1e9 / (flops_step * steps)
    result = {"preset": args.preset, "arch": zoo_cfg.arch, "epochs": zoo_cfg.epochs, "cpus": cluster_cpus(),
              "rows": rows, "best_models_per_task": best["models_per_task"],
              "speedup_best_vs_one_per_task": round(best["models_per_s"] / rows[0]["models_per_s"], 2),
              "flops_per_model": flops_step * steps, "matmul_gflops_per_core": round(gflops, 1),
              "ceiling_models_per_s": round(ceiling, 2),
              "ceiling_vs_one_per_task": round(ceiling / rows[0]["models_per_s"], 2)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"zoo_throughput_{args.preset}.json").write_text(json.dumps(result, indent=2))
    print(f"\n{args.preset}: {zoo_cfg.arch['family']} {zoo_cfg.arch['args']}, {zoo_cfg.epochs} epochs, "
          f"{result['cpus']} CPUs")
    print(f"{'M':>5} {'models':>7} {'seconds':>9} {'models/s':>9} {'min/10k':>8} {'test acc':>9}")
    for r in rows:
        print(f"{r['models_per_task']:>5} {r['models']:>7} {r['seconds']:>9} {r['models_per_s']:>9} "
              f"{r['minutes_for_10000']:>8} {r['test_acc_mean']:>9}")
    print(f"best M = {best['models_per_task']}: {result['speedup_best_vs_one_per_task']}x the models/s of M = 1")
    print(f"compute ceiling: {flops_step * steps / 1e9:.1f} GFLOP per model at {gflops:.1f} GFLOP/s per core: "
          f"{result['ceiling_models_per_s']} models/s, {result['ceiling_vs_one_per_task']}x M = 1 at most")


if __name__ == "__main__":
    main()
