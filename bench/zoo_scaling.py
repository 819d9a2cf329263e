"""Generation quality against zoo size: the first n models of ONE finished zoo go through canon, PCA, flow, sample
and eval with one declared recipe whose settings are functions of n (``RECIPES``), one run root per n; prints
and saves the curve (accuracy, functional novelty, S, the margin over the best baseline with its standard error,
the time of each stage) and plots margin and accuracy against n.

    python bench/zoo_scaling.py SOURCE --n 100,300,1000,3000,10000 --root runs/zoo-scaling --recipe full-k
    python bench/zoo_scaling.py SOURCE --n 1000 --root runs/zoo-scaling-ot --recipe full-k \
        --set flow.ot_coupling=true --reuse runs/zoo-scaling          # a lever: earlier stages linked, not redone
    python bench/zoo_scaling.py SOURCE --ceiling --n 1000,10000      # what the PCA alone costs (no Ray)
    python bench/zoo_scaling.py --add-run ROOT --recipe preset --n 10000   # a finished run of the same zoo
    python bench/zoo_scaling.py [--baselines ROOT]                     # the tables
    python bench/zoo_scaling.py --plot docs/results/zoo-scaling.png --labels preset,k90   # curves of one zoo
    python bench/zoo_scaling.py --ceiling-plot docs/results/zoo-scaling-ceiling.png

SOURCE is a run root whose zoo stage is complete; its config.json gives every setting the recipe does not. The
zoo stage of a point writes the first n rows of SOURCE's manifest (model_id order), pointing at SOURCE's
checkpoints: nothing is trained or copied. ``--reuse BASE`` links BASE/n<N>'s stage folders for the leading
stages whose settings are unchanged (zoo, canon, pca, flow), so that a lever redoes only what it changes (an n
that BASE lacks runs every stage).
Curves are saved in bench/results/zoo_scaling.json under ``--label`` (default: the recipe and the --set values).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pandas as pd

RESULTS = Path(__file__).parent / "results" / "zoo_scaling.json"
SHAREABLE = ("zoo", "canon", "pca", "flow")     # sample and eval are cheap and always redone
# what each stage's outputs depend on, besides the stages before it (sample writes one set per eval temperature)
STAGE_SECTIONS = {"zoo": ("zoo",), "canon": ("canon",), "pca": ("pca",), "flow": ("flow",),
                  "sample": ("sample", "eval"), "eval": ("eval",)}


# ---------------------------------------------------------------- recipes: settings as functions of n

def preset_recipe(n: int) -> dict:
    """The source run's own settings at every n (mnist1d-mlp-scale: k <= 256, 16k flow steps)."""
    return {}


def full_k_recipe(n: int) -> dict:
    """k from the variance kept alone (0.99, no cap below d): the flow's input keeps what the zoo's models
    need to be rebuilt (the PCA ceiling, docs/results-scaling.md); the flow budget stays the preset's."""
    return {"pca.variance_target": 0.99, "pca.max_k": None}


def k90_recipe(n: int) -> dict:
    """k keeping 0.9 of the variance (no cap below d): zoo models rebuilt from those components are about one
    training run away from the zoo in function space (functional novelty 0.93-0.94 at n = 1,000 and 10,000) and
    above the interpolation baseline there (the PCA ceiling), so a flow that reproduces its latents would pass."""
    return {"pca.variance_target": 0.9, "pca.max_k": None}


RECIPES = {"preset": preset_recipe, "full-k": full_k_recipe, "k90": k90_recipe}


# ---------------------------------------------------------------- pure helpers

def first_rows(manifest: pd.DataFrame, n: int) -> pd.DataFrame:
    """The first ``n`` rows of a zoo manifest in model_id order (whatever their status)."""
    if n < 2 or n > len(manifest):
        raise ValueError(f"n={n}: the source zoo has {len(manifest)} models (need 2 <= n <= {len(manifest)})")
    return manifest.sort_values("model_id").head(n).reset_index(drop=True)


def shared_stages(cfg: dict, base: dict) -> list[str]:
    """The leading stages (of ``SHAREABLE``) whose outputs two run configs (``model_dump()`` dicts) share:
    every section a stage or an earlier one depends on is equal."""
    shared = []
    for stage in SHAREABLE:
        if any(cfg[s] != base[s] for s in STAGE_SECTIONS[stage]):
            break
        shared.append(stage)
    return shared


def best_setting(points: list[dict], min_novelty: float, ses: float = 2.0) -> dict | None:
    """The generator point with the largest margin minus ``ses`` standard errors among those at least
    ``min_novelty`` novel in function space (None when there is none)."""
    ok = [p for p in points if p["method"] == "generator" and p["func_novelty"] >= min_novelty and "margin" in p]
    return max(ok, key=lambda p: p["margin"] - ses * p["margin_se"], default=None)


def curve_point(metrics: dict, stages: dict, pca: dict, min_novelty: float = 0.5) -> dict:
    """One point of the curve from a run's report (metrics.json), its stages' _SUCCESS records and pca meta."""
    keep = ("setting", "acc", "se", "func_novelty", "similarity", "margin", "margin_se", "best_baseline")
    gen = [{k: p.get(k) for k in keep} for p in metrics["tradeoff"] if p["method"] == "generator"]
    best = best_setting(metrics["tradeoff"], min_novelty)
    op = metrics["operating_point"]
    return {"zoo_acc": metrics["accuracy"]["zoo"]["mean"], "k": pca["k"],
            "variance_kept": pca.get("explained_variance_total"),
            "operating_point": {k: op.get(k) for k in keep} | {"accepted": op["accepted"]},
            "best": None if best is None else {k: best.get(k) for k in keep},
            "settings": gen, "seconds": {s: v.get("seconds") for s, v in stages.items()}}


# ---------------------------------------------------------------- running a point

def zoo_subset_stage(source_root: str, n: int):
    """A zoo-stage function: the first n rows of the source's manifest, pointing at its checkpoints."""
    def run(cfg, run_store) -> dict:
        from dwf_ray import store
        manifest = first_rows(store.RunStore(source_root).manifest("zoo"), n)
        store.write_table(run_store.stage_uri("zoo", "manifest.parquet"), manifest)
        ok = manifest[manifest["status"] == "ok"]
        return store.counts(manifest) | {"test_acc_mean": float(ok["test_acc"].mean()), "source": source_root}
    return run


def link_stages(pipe, base_root: str, base_cfg: dict, before: str | None = None) -> list[str]:
    """Symlink base_root's complete stage folders that this run shares (local roots), only those before the stage
    ``before`` when it is given."""
    from dwf_ray import store
    linked = []
    shared = shared_stages(pipe.cfg.model_dump(), base_cfg)
    for stage in shared[:SHAREABLE.index(before)] if before else shared:
        folder = store.STAGE_FOLDERS[stage]
        src, dst = os.path.join(base_root, folder), pipe.store.uri(folder)
        if not os.path.exists(os.path.join(src, "_SUCCESS")):
            break
        if not os.path.lexists(dst):
            os.symlink(os.path.abspath(src), dst)
        linked.append(stage)
    return linked


def run_point(source: str, n: int, root: str, recipe: str, sets: list[str], reuse: str | None,
              until: str = "eval") -> dict | None:
    """One zoo size through the stages up to ``until``; its curve point when that is eval."""
    from dwf_ray import store
    from dwf_ray.config import RunConfig
    from dwf_ray.pipeline import STAGE_NAMES, Pipeline
    cfg = RunConfig.model_validate(store.read_json(store.join(source, "config.json")))
    cfg = cfg.with_values({"zoo.n_models": n, **RECIPES[recipe](n)}).with_overrides(sets)
    pipe = Pipeline(f"{root}/n{n}", cfg, quiet=True)
    base = f"{reuse}/n{n}" if reuse else None
    if base and store.exists(store.join(base, "config.json")):
        linked = link_stages(pipe, base, store.read_json(store.join(base, "config.json")))
        print(f"n={n}: linked {linked} from {base}", flush=True)
    elif base:
        print(f"n={n}: {base} has no run; every stage runs", flush=True)
    pipe.run_stage("zoo", zoo_subset_stage(source, n))
    pipe.run(STAGE_NAMES[1:STAGE_NAMES.index(until) + 1])
    return root_point(pipe.store.root) if until == "eval" else None


def root_point(root: str) -> dict:
    """The curve point of a finished run root."""
    from dwf_ray import store
    from dwf_ray.config import RunConfig
    from dwf_ray.pipeline import STAGE_NAMES
    run_store = store.RunStore(root)
    cfg = RunConfig.model_validate(store.read_json(run_store.uri("config.json")))
    stages = {s: run_store.stage_info(store.STAGE_FOLDERS[s]) for s in STAGE_NAMES}
    metrics = store.read_json(run_store.uri("report", "metrics.json"))
    return curve_point(metrics, stages, stages["pca"], cfg.eval.accept_novelty) | {"root": run_store.root}


# ---------------------------------------------------------------- the PCA ceiling

def resolve_ks(spec: str, cumulative) -> dict[str, int]:
    """``64,256,0.9,all`` -> {label: k}: integers as they are (capped at the rank), fractions by the variance
    they keep (the smallest k reaching it), ``all`` every component."""
    import numpy as np
    out = {}
    for item in spec.split(","):
        if item == "all":
            out[item] = len(cumulative)
        elif "." in item:
            out[item] = int(min(len(cumulative), np.searchsorted(cumulative, float(item) - 1e-12) + 1))
        else:
            out[item] = min(int(item), len(cumulative))
    return out


def ceiling(root: str, ks: str, n: int, models: int = 200, reference: int = 1000) -> list[dict]:
    """What the PCA alone costs: the first ``models`` canonical models of a run rebuilt from their top-k
    components (mean + z_k V_k^T, the PCA fit on its first ``n`` canonical models), their mean test accuracy and
    functional novelty against the first ``reference`` zoo models (the unit: those models' own median
    nearest-neighbour D)."""
    import numpy as np
    import torch
    from dwf_ray import store
    from dwf_ray.archs import ArchSpec
    from dwf_ray.config import RunConfig
    from dwf_ray.eval.diversity import disagreement_nearest
    from dwf_ray.eval.scoring import score_flat
    from dwf_ray.pca.covariance import covariance_pca
    from dwf_ray.pca.dual import dual_pca
    from dwf_ray.weights import load_flat_models
    torch.set_num_threads(1)
    run_store = store.RunStore(root)
    cfg = RunConfig.model_validate(store.read_json(run_store.uri("config.json")))
    rows = first_rows(store.ok_rows(run_store.manifest("canon")), n)
    x = load_flat_models(rows["canon_uri"], ArchSpec.parse(cfg.zoo.arch)).astype(np.float64)
    mean, comps, z, eig = (dual_pca if len(x) <= x.shape[1] else covariance_pca)(x, variance_target=None)
    cum = np.cumsum(eig.explained_variance_ratio)
    args = (ArchSpec.parse(cfg.zoo.arch).to_json(), cfg.zoo.model_dump_json(), cfg.eval.model_dump_json())

    def score(flat) -> tuple[float, np.ndarray]:
        acc, _, _, preds = score_flat(*args, np.asarray(flat, dtype=np.float32))
        return 100 * float(acc.mean()), preds
    m, ref = min(models, len(x)), min(reference, len(x))
    _, ref_preds = score(x[:ref])
    unit = float(np.median(disagreement_nearest(ref_preds, ref_preds, exclude_self=True)[0]))
    out = []
    for label, k in [("zoo", None), ("mean model", 0), *resolve_ks(ks, cum).items()]:
        flat = x[:m] if k is None else mean + z[:m, :k] @ comps[:, :k].T
        acc, preds = score(flat)
        nov = float(np.median(disagreement_nearest(preds, ref_preds)[0]) / unit) if k is not None else None
        out.append({"k": label, "components": k, "variance": None if not k else float(cum[k - 1]),
                    "acc": acc, "func_novelty": nov})
        print(f"n={n} k={label} ({k} components, variance {out[-1]['variance']}): rebuilt accuracy "
              f"{acc:.2f} %, functional novelty {nov}", flush=True)
    return out


# ---------------------------------------------------------------- table and plot

def best_baseline_at(tradeoff: list[dict], novelty: float) -> tuple[str, float]:
    """The best baseline of a report's trade-off points at a functional novelty, and its accuracy there."""
    from dwf_ray.eval.tradeoff import baseline_at
    methods = dict.fromkeys(p["method"] for p in tradeoff if p["method"] != "generator")
    accs = {m: baseline_at(tradeoff, m, novelty) for m in methods}
    best = max(accs, key=accs.get)
    return best, accs[best]


def print_ceiling(ceilings: dict, tradeoff: list[dict] | None = None) -> None:
    """The ceiling table; with a report's trade-off points, each row's best baseline at its novelty."""
    print("| n | k | variance kept | rebuilt acc % | functional novelty | best baseline there % | difference |")
    print("|---|---|---|---|---|---|---|")
    for n in sorted(ceilings, key=int):
        for r in ceilings[n]:
            var = "-" if r["variance"] is None else f"{r['variance']:.3f}"
            nov = "-" if r["func_novelty"] is None else f"{r['func_novelty']:.2f}"
            k = r["k"] if r["components"] in (None, 0) else f"{r['k']} ({r['components']})"
            base = "- | -"
            if tradeoff and r["func_novelty"] is not None:
                name, acc = best_baseline_at(tradeoff, r["func_novelty"])
                base = f"{acc:.2f} ({name}) | {r['acc'] - acc:+.2f}"
            print(f"| {int(n):,} | {k} | {var} | {r['acc']:.2f} | {nov} | {base} |")


def print_curve(label: str, curve: dict) -> None:
    print(f"\n{label}")
    print("| n | k (variance) | zoo % | T=1 acc % | func. novelty | S | margin (SE) vs best | best setting "
          "(margin - 2 SE) | canon s | pca s | flow s | sample s | eval s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n in sorted(curve, key=int):
        p = curve[n]
        op, b, s = p["operating_point"], p["best"], p["seconds"]
        best = "-" if b is None else (f"{b['setting']}: {b['acc']:.2f} at {b['func_novelty']:.2f}, "
                                      f"{b['margin']:+.2f} ({b['margin_se']:.2f})")
        var = "-" if p["variance_kept"] is None else f"{p['variance_kept']:.3f}"
        print(f"| {int(n):,} | {p['k']} ({var}) | {p['zoo_acc']:.2f} | {op['acc']:.2f} | {op['func_novelty']:.2f} | "
              f"{op['similarity']:.3f} | {op['margin']:+.2f} ({op['margin_se']:.2f}) vs {op['best_baseline']} | "
              f"{best} | " + " | ".join(f"{s.get(k) or 0:.0f}" for k in ("canon", "pca", "flow", "sample", "eval"))
              + " |")


def plot(curves: dict, path: str) -> None:
    from dwf_ray.eval.report import pyplot
    plt = pyplot()
    fig, (ax_m, ax_a) = plt.subplots(1, 2, figsize=(11, 5))
    zoo = {}
    for label, curve in curves.items():
        ns = sorted(curve, key=int)
        x = [int(n) for n in ns]
        ops = [curve[n]["operating_point"] for n in ns]
        line = ax_m.errorbar(x, [o["margin"] for o in ops], yerr=[o["margin_se"] for o in ops], marker="o",
                             capsize=3, label=f"{label}: T=1")
        color = line[0].get_color()
        best = [(int(n), curve[n]["best"]) for n in ns if curve[n]["best"]]
        if best:
            ax_m.scatter([n for n, _ in best], [b["margin"] for _, b in best], marker="D", facecolors="none",
                         edgecolors=color, label=f"{label}: best setting at novelty >= 0.5")
        ax_a.errorbar(x, [o["acc"] for o in ops], yerr=[o["se"] for o in ops], marker="o", capsize=3,
                      color=color, label=f"{label}: generated, T=1")
        zoo |= {int(n): curve[n]["zoo_acc"] for n in ns}
    ax_a.plot(sorted(zoo), [zoo[n] for n in sorted(zoo)], ls=":", color="black", label="zoo (its first n models)")
    ax_m.axhline(0, color="grey", lw=0.8)
    ax_m.set(xscale="log", xlabel="zoo models n (first n of one zoo)",
             ylabel="margin over the best baseline (pp), +-1 SE", title="margin at equal functional novelty")
    ax_a.set(xscale="log", xlabel="zoo models n", ylabel="mean test accuracy %", title="accuracy")
    for ax in (ax_m, ax_a):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2))    # below: the points stay clear
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    print(f"plot: {path}")


def plot_ceiling(ceilings: dict, path: str) -> None:
    from dwf_ray.eval.report import pyplot
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for n in sorted(ceilings, key=int):
        rows = sorted((r for r in ceilings[n] if r["components"]), key=lambda r: r["components"])
        line, = ax.plot([r["components"] for r in rows], [r["acc"] for r in rows], marker="o", label=f"n = {int(n):,}")
        zoo = next(r["acc"] for r in ceilings[n] if r["components"] is None)
        ax.axhline(zoo, ls=":", color=line.get_color())
    ax.set(xscale="log", xlabel="principal components k", ylabel="mean test accuracy % (dotted: the zoo)",
           title="PCA ceiling: models rebuilt from k components")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def load_results() -> dict:
    """{"curves": {label: {n: point}}, "ceiling": {root: rows}}"""
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else {"curves": {}, "ceiling": {}}


def save(kind: str, key: str, value, sub: str | None = None) -> None:
    """Store one ceiling (``kind`` "ceiling", ``key`` n) or one curve point ("curves", label, ``sub`` n), reading
    the file again first so that separate runs of the bench add to it."""
    results = load_results()
    if sub is None:
        results[kind][key] = value
    else:
        results[kind].setdefault(key, {})[sub] = value
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1))


def save_preset_curve(preset: str, label: str) -> None:
    """The saved curve ``label`` as ``preset``'s measured curve (dwf_ray/eval/zoo_curves.json): the operating
    point at each n, with the zoo it came from."""
    from dwf_ray import store
    from dwf_ray.eval.zoo_curve import save_curve
    curve = load_results()["curves"][label]
    ns = sorted(curve, key=int)
    largest = curve[ns[-1]]["root"]      # a point of the bench names its source zoo; an added run is its own
    source = store.read_json(store.join(largest, "zoo", "_SUCCESS")).get("source") or largest
    size = len(store.RunStore(source).manifest("zoo"))
    about = (f"the first n models of one {size:,}-model zoo, the preset's own settings, "
             f"`python bench/zoo_scaling.py` recipe '{curve[ns[-1]]['recipe']}'")
    save_curve(preset, about, [{"n": int(n), "zoo_acc": curve[n]["zoo_acc"], **curve[n]["operating_point"]}
                               for n in ns])
    print(f"{preset}: curve '{label}' ({', '.join(ns)}) saved for its reports")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", nargs="?", help="a run root whose zoo stage is complete")
    ap.add_argument("--n", default="100,300,1000,3000,10000")
    ap.add_argument("--root", default="runs/zoo-scaling")
    ap.add_argument("--recipe", choices=sorted(RECIPES), default="full-k")
    ap.add_argument("--set", action="append", default=[], help="extra section.key=value overrides (a lever)")
    ap.add_argument("--reuse", help="a root of earlier points whose unchanged stages are linked, not redone")
    ap.add_argument("--label", help="the curve's name in the results file and the plot")
    ap.add_argument("--until", default="eval", help="the last stage to run (eval: a point of the curve)")
    ap.add_argument("--plot", help="write the plot of the saved curves (--labels, default every one) to this PNG")
    ap.add_argument("--labels", help="with --plot: the curves to draw, comma-separated (curves of one zoo)")
    ap.add_argument("--ceiling-plot", help="write the plot of the saved PCA ceilings to this PNG")
    ap.add_argument("--ceiling", action="store_true", help="instead: the PCA ceiling of SOURCE's first n "
                    "canonical models at each --n")
    ap.add_argument("--ks", default="16,64,256,1024,0.5,0.9,0.99,all", help="the ceiling's k: counts, variance "
                    "shares, all")
    ap.add_argument("--add-run", metavar="ROOT", help="instead: add a finished run root (of SOURCE's first --n "
                    "models, made with --recipe) to the curve --label")
    ap.add_argument("--save-curve", metavar="PRESET", help="instead: store the curve --label (default: recipe "
                    "preset) as PRESET's measured curve, shown in the reports of that preset's runs")
    ap.add_argument("--baselines", metavar="ROOT", help="with no SOURCE: set the ceiling against this run's "
                    "baselines at equal functional novelty")
    args = ap.parse_args()
    if args.ceiling:
        for n in args.n.split(","):
            save("ceiling", n, ceiling(args.source, args.ks, int(n)))
        return
    label, recipe = args.label or " ".join([args.recipe, *args.set]), {"recipe": args.recipe, "set": args.set}
    if args.save_curve:
        save_preset_curve(args.save_curve, args.label or "preset")
        return
    if args.add_run:
        save("curves", label, root_point(args.add_run) | recipe, args.n)
    elif args.source:
        for n in args.n.split(","):
            point = run_point(args.source, int(n), args.root, args.recipe, args.set, args.reuse, args.until)
            if point is not None:
                save("curves", label, point | recipe, n)
                print_curve(label, load_results()["curves"][label])
    results = load_results()
    if not args.source and not args.add_run and not args.plot and not args.ceiling_plot:
        tradeoff = None
        if args.baselines:
            from dwf_ray import store
            tradeoff = store.read_json(store.join(args.baselines, "report", "metrics.json"))["tradeoff"]
        print_ceiling(results["ceiling"], tradeoff)
        for label, curve in results["curves"].items():
            print_curve(label, curve)
    if args.plot:
        labels = args.labels.split(",") if args.labels else list(results["curves"])
        plot({label: results["curves"][label] for label in labels}, args.plot)
    if args.ceiling_plot:
        plot_ceiling(results["ceiling"], args.ceiling_plot)


if __name__ == "__main__":
    main()
