"""metrics.json, report.md and PNG plots of a run, rendered from the metric registry (eval/metrics.py)."""
from __future__ import annotations

import io

import numpy as np

from dwf_ray import store
from dwf_ray.eval.metrics import METRICS, NOVELTY, fmt
from dwf_ray.eval.zoo_curve import curve_section, measured_curve, plot_curve


def summary(acc: np.ndarray) -> dict:
    acc = np.asarray(acc, dtype=np.float64) * 100
    return {"mean": float(acc.mean()), "std": float(acc.std()), "min": float(acc.min()), "max": float(acc.max()),
            "n": int(len(acc))}


def accuracy_table(rows: dict[str, dict]) -> str:
    """Zoo and generated models first, then the other sets (metrics.json stores its keys sorted)."""
    lines = ["| models | n | mean acc % | std | min | max |", "|---|---|---|---|---|---|"]
    for name, s in sorted(rows.items(), key=lambda kv: (kv[0] != "zoo", kv[0] != "generated", kv[0])):
        lines.append(f"| {name} | {s['n']} | {s['mean']:.2f} | {s['std']:.2f} | {s['min']:.2f} | {s['max']:.2f} |")
    return "\n".join(lines)


def tradeoff_table(points: list[dict], zoo: dict | None = None) -> str:
    """One row per set, a column per registered metric; generator rows also show their margin over the best
    baseline at equal functional novelty."""
    cols = [m for m in METRICS if m.key != "se"]
    lines = ["| method | setting | " + " | ".join(m.label for m in cols) + " | vs best baseline (SE) |",
             "|---|---|" + "---|" * len(cols) + "---|"]
    for p in ([zoo] if zoo else []) + points:
        cells = [fmt(m.key, p.get(m.key)) + (f" ({p['se']:.2f})" if m.key == "acc" and "se" in p else "")
                 for m in cols]
        margin = (f"{p['margin']:+.2f} ({p['margin_se']:.2f}) vs {p['best_baseline']}"
                  if p.get("margin") is not None else "-")
        lines.append(f"| {p['method']} | {p['setting']} | " + " | ".join(cells) + f" | {margin} |")
    return "\n".join(lines)


def png_bytes(fig) -> bytes:
    """A matplotlib figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_histogram(zoo_acc: np.ndarray, gen_acc: np.ndarray) -> bytes:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    lo, hi = min(zoo_acc.min(), gen_acc.min()) * 100, max(zoo_acc.max(), gen_acc.max()) * 100
    bins = np.linspace(lo - 0.25, hi + 0.25, 30)
    ax.hist(zoo_acc * 100, bins=bins, alpha=0.6, label=f"zoo (mean {zoo_acc.mean() * 100:.2f}%)")
    ax.hist(gen_acc * 100, bins=bins, alpha=0.6, label=f"generated (mean {gen_acc.mean() * 100:.2f}%)")
    ax.set_xlabel("test accuracy %")
    ax.set_ylabel("models")
    ax.legend()
    data = png_bytes(fig)
    plt.close(fig)
    return data


def plot_tradeoff(points: list[dict], zoo: dict, zoo_std: float, axis: str = NOVELTY,
                  min_novelty: float | None = None) -> bytes:
    """Accuracy against novelty on ``axis``: the generator at each temperature, every baseline as a curve,
    the zoo (novelty 1.0 by definition in function space) with its spread."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.3))
    methods = list(dict.fromkeys(p["method"] for p in points))
    for i, method in enumerate(methods):
        pts = sorted((p for p in points if p["method"] == method and p.get(axis) is not None), key=lambda p: p[axis])
        if not pts:
            continue
        gen = method.startswith("generator")
        ax.plot([p[axis] for p in pts], [p["acc"] for p in pts], "-" if gen else "--", marker="o" if gen else "s",
                ms=5 if gen else 3, lw=2 if gen else 1, label=method, zorder=3 if gen else 2)
        if gen:
            for p in pts:
                ax.annotate(p["setting"], (p[axis], p["acc"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if zoo.get(axis) is not None:
        ax.errorbar([zoo[axis]], [zoo["acc"]], yerr=[zoo_std], fmt="k*", ms=10, capsize=3, label="zoo (mean, std)")
    ax.axhspan(zoo["acc"] - zoo_std, zoo["acc"] + zoo_std, color="gray", alpha=0.12)
    if min_novelty is not None:
        ax.axvline(min_novelty, color="gray", lw=0.8, ls="--", label=f"novelty {min_novelty:g}")
    label = next(m.label for m in METRICS if m.key == axis)
    gen_accs = [p["acc"] for p in points if p["method"].startswith("generator")]
    if gen_accs:     # the generator's range, not the far ends of the strongest baselines
        ax.set_ylim(min(gen_accs) - 5, zoo["acc"] + max(2 * zoo_std, 1))
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlim(left=0)
    ax.set_xlabel(label + " (log scale above 1)")
    ax.set_ylabel("mean test accuracy %")
    ax.legend(fontsize=7)
    data = png_bytes(fig)
    plt.close(fig)
    return data


def summary_text(metrics: dict, report_uri: str, total: float | None = None) -> str:
    """The accuracy and trade-off tables and the verdict, as printed at the end of a run."""
    operating = metrics["operating_point"]
    return ("\n" + accuracy_table(metrics["accuracy"]) + "\n\n" + tradeoff_table(metrics["tradeoff"], metrics["zoo"]) +
            f"\n\nfunctional novelty {operating[NOVELTY]:.3f}; margin {operating['margin']:+.2f} "
            f"(SE {operating['margin_se']:.2f}) over "
            f"{operating['best_baseline']}; accepted: {operating['accepted']}; report: {report_uri}" +
            (f"; total {total:.1f} s" if total else ""))


def write_report_files(report_dir: str, metrics: dict, markdown: str) -> None:
    """A report folder's metrics.json and report.md (the eval stage's and a conditional run's)."""
    store.write_json(store.join(report_dir, "metrics.json"), metrics)
    store.write_bytes(store.join(report_dir, "report.md"), markdown.encode())


def write_report(report_dir: str, metrics: dict, zoo_acc: np.ndarray, gen_acc: np.ndarray) -> str:
    """Writes metrics.json, accuracy.png, tradeoff.png (functional novelty), tradeoff_weight.png (weight-space
    diagnostic, when measured), zoo_curve.png (when the preset has a measured curve of quality against zoo size)
    and report.md; returns the markdown."""
    operating, zoo_std = metrics["operating_point"], metrics["accuracy"]["zoo"]["std"]
    store.write_bytes(store.join(report_dir, "accuracy.png"), plot_histogram(zoo_acc, gen_acc))
    store.write_bytes(store.join(report_dir, "tradeoff.png"),
                      plot_tradeoff(metrics["tradeoff"], metrics["zoo"], zoo_std, NOVELTY, operating["min_novelty"]))
    weight_plot = ""
    if metrics["zoo"].get("weight_novelty") is not None:
        store.write_bytes(store.join(report_dir, "tradeoff_weight.png"),
                          plot_tradeoff(metrics["tradeoff"], metrics["zoo"], zoo_std, "weight_novelty"))
        weight_plot = "\n\nDiagnostic, in weight space up to permutation:\n\n![weight-space trade-off](tradeoff_weight.png)"
    curve_md = ""
    curve = measured_curve(metrics["preset"])
    if curve:
        n_zoo = metrics["diversity"]["zoo_reference"]["zoo_models"]
        store.write_bytes(store.join(report_dir, "zoo_curve.png"), plot_curve(curve, n_zoo, operating))
        curve_md = "\n" + curve_section(metrics["preset"], curve, n_zoo, operating, metrics["accuracy"]["zoo"]["mean"])
    verdict = "PASS" if operating["accepted"] else "FAIL"
    timings = "\n".join(f"| {k} | {v:.1f} |" for k, v in metrics.get("timings", {}).items())
    model = metrics.get("model")
    model_line = (f"Models: `{model['family']}` ({model['n_params']:,} parameters) on `{model['dataset']}`.\n"
                  if model else "")
    glossary = "\n".join(f"- **{m.label}**: {m.about}" for m in METRICS)
    baselines = ", ".join(f"{k} {v:.2f} %" for k, v in (operating.get("baselines_at") or {}).items())
    ref = metrics.get("diversity", {}).get("zoo_reference")
    reference = ref["how"] if ref else "each zoo model against the rest of the zoo"
    md = f"""# dwf-ray report: {metrics['preset']}

{model_line}Run root: `{metrics['root']}`. Test split only for this report; models were selected on validation data,
BatchNorm (when present) recalibrated on the training split.

## Accuracy (test split)

{accuracy_table(metrics['accuracy'])}

![accuracy histogram](accuracy.png)

## Accuracy against functional novelty

Novelty is measured in function space, on the test inputs: D is a model's disagreement with its nearest zoo
model (no weight matching involved), S the largest overlap of its wrong predictions with a zoo model's; the
zoo's own values (its row, the unit of novelty) come from {reference}.

{glossary}

{tradeoff_table(metrics['tradeoff'], metrics['zoo'])}

![trade-off](tradeoff.png){weight_plot}

Operating point ({operating['setting']}): accuracy {operating['acc']:.2f} % at functional novelty {operating[NOVELTY]:.3f}; the
baselines at that novelty: {baselines}; margin over the best ({operating['best_baseline']}) {operating['margin']:+.2f} points
(standard error {operating['margin_se']:.2f}). Accepted (functional novelty >= {operating['min_novelty']:g} and a margin of
more than one standard error): **{verdict}**. Gap to the zoo mean: {operating['gap_to_zoo']:.2f} points. Generator
settings that pass: {', '.join(operating.get('passing_settings') or []) or 'none'}.
{curve_md}
## Stage times (seconds)

| stage | seconds |
|---|---|
{timings}
"""
    write_report_files(report_dir, metrics, md)
    return md
