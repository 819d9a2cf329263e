"""Transfer learning benchmark: generated vs zoo vs randomly initialised models as starting points.

Runs the pipeline (zoo, canon, pca, flow, sample; no eval) for a zoo trained on the source classes
(digits 0-4), then gives every starting model a new head for the target classes (digits 5-9) and
fine-tunes all its weights for each epoch budget (``dwf_ray.analysis.transfer``; the epoch with the best
validation accuracy within the budget is kept, test data only measures). For every seed it takes
``--per-source`` different models of each source; accuracy is averaged over those models, then
mean and std over seeds are reported. Fine-tunes run as Ray tasks (one per starting model).

    python bench/transfer.py                       # digits-mlp, budgets 1,5,25, 3 seeds x 10 models
    python bench/transfer.py --set zoo.n_models=40 --set flow.steps=4000 --root runs/transfer-small

Writes bench/results/transfer.json and bench/results/transfer.png and prints a table.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import ray
import torch

from dwf_ray.archs import ArchSpec
from dwf_ray.config import ZooConfig
from dwf_ray.data import dataset_for
from dwf_ray.accuracy import accuracy, recalibrate_batchnorm
from dwf_ray.analysis.transfer import source_model, transfer_accuracies
from dwf_ray.pipeline import Pipeline
from dwf_ray.presets import preset
from dwf_ray.runtime import ensure_ray
from dwf_ray.runtime.progress import wait_with_progress
from dwf_ray.weights import load_model_state

SOURCES = ("generated", "zoo", "random init")
STAGES = ("zoo", "canon", "pca", "flow", "sample")


@ray.remote(num_cpus=1)
def transfer_task(arch_json: str, uri: str | None, init_seed: int, source_json: str, target_json: str,
                  budgets: list[int], seed: int) -> dict:
    """Source-task test accuracy of one starting model, and its target test accuracy per epoch budget."""
    torch.set_num_threads(1)
    arch = ArchSpec.from_json(arch_json)
    source, target = ZooConfig.model_validate_json(source_json), ZooConfig.model_validate_json(target_json)
    state = load_model_state(uri, arch)[0] if uri else None
    model = source_model(arch, state, init_seed)
    src = dataset_for(source)
    source_acc = accuracy(recalibrate_batchnorm(model, src.train), src.test)
    return {"source_acc": source_acc, "acc": transfer_accuracies(arch, state, target, budgets, seed, init_seed)}


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def check_head(cfg: ZooConfig) -> None:
    """The zoo's models must output one logit per source class."""
    data = dataset_for(cfg)
    with torch.no_grad():
        out = source_model(cfg.arch, None).eval()(data.train.x[:2]).shape[-1]
    if out != data.n_classes:
        raise SystemExit(f"zoo.arch outputs {out} classes but zoo.classes has {data.n_classes}: "
                         f"set the architecture's class-count argument with --set")


def run_pipeline(args) -> Pipeline:
    n_needed = args.seeds * args.per_source
    overrides = [f"zoo.classes={json.dumps(args.source_classes)}", f"sample.n={n_needed}",
                 "eval.compare_no_canon=false", *(args.set or ["zoo.arch.args.out_dim=5"])]
    cfg = preset(args.preset).with_overrides(overrides)
    if cfg.zoo.n_models < n_needed:
        raise SystemExit(f"zoo.n_models={cfg.zoo.n_models}: need at least seeds x per-source = {n_needed}")
    check_head(cfg.zoo)
    pipe = Pipeline(args.root, cfg)
    pipe.run(STAGES)
    return pipe


def summarise(records: list[dict], budgets: list[int]) -> dict:
    """Per source and budget: mean and std over seeds of the per-seed mean accuracy (and over all models)."""
    out = {}
    for source in SOURCES:
        rows = [r for r in records if r["source"] == source]
        seeds = sorted({r["seed"] for r in rows})
        per_model = np.array([r["acc"] for r in rows])                                   # (models, budgets)
        per_seed = np.array([np.mean([r["acc"] for r in rows if r["seed"] == s], axis=0) for s in seeds])
        out[source] = {
            "source_acc_mean": float(np.mean([r["source_acc"] for r in rows])),
            "budgets": {str(b): {"mean": float(per_seed[:, j].mean()), "std_over_seeds": float(per_seed[:, j].std()),
                                 "std_over_models": float(per_model[:, j].std()),
                                 "min": float(per_model[:, j].min()), "max": float(per_model[:, j].max()),
                                 "n_models": len(rows), "n_seeds": len(seeds)}
                        for j, b in enumerate(budgets)}}
    return out


def table(summary: dict, budgets: list[int]) -> str:
    head = "| source | source-task acc % | " + " | ".join(f"{b} epoch{'s' * (b > 1)} %" for b in budgets) + " |"
    lines = [head, "|" + "---|" * (len(budgets) + 2)]
    for source, s in summary.items():
        cells = [f"{100 * s['budgets'][str(b)]['mean']:.2f} ± {100 * s['budgets'][str(b)]['std_over_seeds']:.2f}"
                 for b in budgets]
        lines.append(f"| {source} | {100 * s['source_acc_mean']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: dict, budgets: list[int], title: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for source, s in summary.items():
        mean = [100 * s["budgets"][str(b)]["mean"] for b in budgets]
        std = [100 * s["budgets"][str(b)]["std_over_seeds"] for b in budgets]
        ax.errorbar(budgets, mean, yerr=std, marker="o", capsize=4, label=source)
    ax.set_xscale("log")
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.set_xlabel("fine-tuning epochs")
    ax.set_ylabel("target test accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="runs/transfer-digits04", help="run root of the source-task pipeline")
    ap.add_argument("--preset", default="digits-mlp")
    ap.add_argument("--set", action="append", help="config override section.key=value (repeatable); "
                    "default: zoo.arch.args.out_dim=5 (the digits-mlp head for 5 source classes)")
    ap.add_argument("--source-classes", type=_ints, default=[0, 1, 2, 3, 4])
    ap.add_argument("--target-classes", type=_ints, default=[5, 6, 7, 8, 9])
    ap.add_argument("--budgets", type=_ints, default=[1, 5, 25], help="fine-tuning epoch budgets")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--per-source", type=int, default=10, help="models of each source per seed")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()

    t0 = time.perf_counter()
    pipe = run_pipeline(args)
    t_pipe = time.perf_counter() - t0
    source_cfg = pipe.cfg.zoo
    target_cfg = source_cfg.model_copy(update={"classes": args.target_classes})
    zoo = pipe.store.manifest("zoo")
    zoo_uris = list(zoo[zoo["status"] == "ok"].sort_values("model_id")["uri"])
    gen_uris = list(pipe.store.manifest("sample").sort_values("model_id")["uri"])
    n_needed = args.seeds * args.per_source
    if len(zoo_uris) < n_needed:
        raise SystemExit(f"{pipe.store.root}: only {len(zoo_uris)} usable zoo models, need {n_needed}")

    ensure_ray()
    arch_json = pipe.arch.to_json()
    jobs, refs = [], []
    for seed in range(args.seeds):
        for i in range(args.per_source):
            k = seed * args.per_source + i          # a different model of each source for every seed
            ft_seed = 1000 * seed + i                # same head init and batch order for the three sources
            for source, uri in zip(SOURCES, (gen_uris[k], zoo_uris[k], None)):
                jobs.append({"source": source, "seed": seed, "uri": uri, "ft_seed": ft_seed})
                refs.append(transfer_task.remote(arch_json, uri, 100_000 + k, source_cfg.model_dump_json(),
                                                 target_cfg.model_dump_json(), args.budgets, ft_seed))
    t1 = time.perf_counter()
    results = wait_with_progress(refs, "transfer: fine-tuning")
    t_ft = time.perf_counter() - t1
    records = [job | res for job, res in zip(jobs, results)]

    summary = summarise(records, args.budgets)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    title = (f"{pipe.cfg.preset}: digits {args.source_classes} -> {args.target_classes}, "
             f"{args.seeds} seeds x {args.per_source} models")
    plot(summary, args.budgets, title, out / "transfer.png")
    (out / "transfer.json").write_text(json.dumps({
        "root": pipe.store.root, "config": pipe.cfg.model_dump(), "target_classes": args.target_classes,
        "budgets": args.budgets, "seeds": args.seeds, "per_source": args.per_source,
        "selection": "best validation epoch within the budget; test accuracy reported",
        "seconds": {"pipeline": round(t_pipe, 1), "fine_tuning": round(t_ft, 1)},
        "summary": summary, "records": records}, indent=2))
    print(f"\n{title}\nmean ± std over seeds of the per-seed mean target test accuracy\n")
    print(table(summary, args.budgets))
    print(f"\npipeline {t_pipe:.1f} s, {len(refs)} fine-tunes {t_ft:.1f} s; "
          f"wrote {out / 'transfer.json'} and {out / 'transfer.png'}")


if __name__ == "__main__":
    main()
