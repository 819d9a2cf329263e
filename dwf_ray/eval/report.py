"""metrics.json, report.md and PNG plots of a run."""
from __future__ import annotations

import io

import numpy as np

from dwf_ray import store


def summary(acc: np.ndarray) -> dict:
    acc = np.asarray(acc, dtype=np.float64) * 100
    return {"mean": float(acc.mean()), "std": float(acc.std()), "min": float(acc.min()), "max": float(acc.max()),
            "n": int(len(acc))}


def accuracy_table(rows: dict[str, dict]) -> str:
    lines = ["| models | n | mean acc % | std | min | max |", "|---|---|---|---|---|---|"]
    for name, s in rows.items():
        lines.append(f"| {name} | {s['n']} | {s['mean']:.2f} | {s['std']:.2f} | {s['min']:.2f} | {s['max']:.2f} |")
    return "\n".join(lines)


def tradeoff_table(points: list[dict]) -> str:
    """One row per set; generator rows also show their margin over the better baseline at equal novelty."""
    lines = ["| method | setting | mean acc % (SE) | novelty ratio | wrong-pred IoU | vs best baseline (SE) |",
             "|---|---|---|---|---|---|"]
    for p in points:
        iou = f"{p['iou']:.3f}" if p.get("iou") is not None else "-"
        acc = f"{p['acc']:.2f}" + (f" ({p['se']:.2f})" if "se" in p else "")
        margin = f"{p['margin']:+.2f}" if p.get("margin") is not None else "-"
        if "margin_se" in p:
            margin += f" ({p['margin_se']:.2f})"
        lines.append(f"| {p['method']} | {p['setting']} | {acc} | {p['novelty']:.3f} | {iou} | {margin} |")
    return "\n".join(lines)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def plot_histogram(zoo_acc: np.ndarray, gen_acc: np.ndarray) -> bytes:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    lo, hi = min(zoo_acc.min(), gen_acc.min()) * 100, max(zoo_acc.max(), gen_acc.max()) * 100
    bins = np.linspace(lo - 0.25, hi + 0.25, 30)
    ax.hist(zoo_acc * 100, bins=bins, alpha=0.6, label=f"zoo (mean {zoo_acc.mean() * 100:.2f}%)")
    ax.hist(gen_acc * 100, bins=bins, alpha=0.6, label=f"generated (mean {gen_acc.mean() * 100:.2f}%)")
    ax.set_xlabel("test accuracy %")
    ax.set_ylabel("models")
    ax.legend()
    data = _png(fig)
    plt.close(fig)
    return data


def plot_tradeoff(points: list[dict], zoo_mean: float) -> bytes:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4))
    styles = {"generator": "o-", "noise": "s--", "interpolation": "^--", "generator (no canon)": "x"}
    for method, style in styles.items():
        pts = sorted((p for p in points if p["method"] == method), key=lambda p: p["novelty"])
        if pts:
            ax.plot([p["novelty"] for p in pts], [p["acc"] for p in pts], style, label=method)
            for p in pts:
                if method == "generator":
                    ax.annotate(p["setting"], (p["novelty"], p["acc"]), fontsize=7, xytext=(3, 3),
                                textcoords="offset points")
    ax.axhline(zoo_mean, color="gray", lw=0.8, ls=":", label=f"zoo mean {zoo_mean:.2f}%")
    ax.axvline(0.25, color="gray", lw=0.8, ls="--", label="novelty 0.25")
    ax.set_xlabel("novelty ratio (median NN distance to zoo / zoo's median NN distance)")
    ax.set_ylabel("mean test accuracy %")
    ax.legend(fontsize=8)
    data = _png(fig)
    plt.close(fig)
    return data


def write_report(report_dir: str, metrics: dict, zoo_acc: np.ndarray, gen_acc: np.ndarray) -> str:
    """Writes metrics.json, accuracy.png, tradeoff.png and report.md; returns the markdown."""
    store.write_json(store.join(report_dir, "metrics.json"), metrics)
    store.write_bytes(store.join(report_dir, "accuracy.png"), plot_histogram(zoo_acc, gen_acc))
    store.write_bytes(store.join(report_dir, "tradeoff.png"), plot_tradeoff(metrics["tradeoff"],
                                                                             metrics["accuracy"]["zoo"]["mean"]))
    acc = metrics["accuracy"]
    acc_rows = {"zoo": acc["zoo"], "generated": acc["generated"]}
    if "generated_no_canon" in acc:
        acc_rows["generated (no canon)"] = acc["generated_no_canon"]
    op = metrics["operating_point"]
    verdict = "PASS" if op["accepted"] else "FAIL"
    timings = "\n".join(f"| {k} | {v:.1f} |" for k, v in metrics.get("timings", {}).items())
    model = metrics.get("model")
    model_line = (f"Models: `{model['family']}` ({model['n_params']:,} parameters) on `{model['dataset']}`.\n"
                  if model else "")
    md = f"""# dwf-ray report: {metrics['preset']}

{model_line}Run root: `{metrics['root']}`. Test split only for this report; models were selected on validation data,
BatchNorm (when present) recalibrated on the training split.

## Accuracy (test split)

{accuracy_table(acc_rows)}

![accuracy histogram](accuracy.png)

## Diversity

Distances are in canonical weight space, up to permutation (each model weight-matched onto its nearest
zoo candidates).

- zoo median nearest-neighbour distance: {metrics['diversity']['zoo_nn_median']:.4f}
- generated: novelty ratio {metrics['diversity']['novelty_ratio']:.3f}; mean wrong-prediction IoU with the
  nearest zoo model {metrics['diversity']['wrong_iou_mean']:.3f} (zoo models against their nearest other zoo
  model: {metrics['diversity']['zoo_wrong_iou_mean']:.3f})
- spread of the generated set (its own median nearest-neighbour distance over the zoo's, both direct):
  {metrics['diversity']['generated_self_nn_ratio']:.3f}; {metrics['diversity']['distinct_nearest_zoo_models']} distinct
  zoo models are the nearest of some generated model

## Accuracy-novelty trade-off

{tradeoff_table(metrics['tradeoff'])}

![trade-off](tradeoff.png)

Operating point (temperature {op['temperature']}): accuracy {op['acc']:.2f} % at novelty {op['novelty']:.3f};
noise baseline at equal novelty {op['noise_acc_at_novelty']:.2f} %, interpolation baseline
{op['interp_acc_at_novelty']:.2f} %; margin over the better one {op['margin']:+.2f} points (standard error
{op['margin_se']:.2f}). Beats both baselines with novelty >= 0.25: **{verdict}**.
Gap to the zoo mean: {op['gap_to_zoo']:.2f} points. Generator settings that beat both baselines with
novelty >= 0.25: {', '.join(op.get('passing_settings') or []) or 'none'}.

## Stage times (seconds)

| stage | seconds |
|---|---|
{timings}
"""
    store.write_bytes(store.join(report_dir, "report.md"), md.encode())
    return md


def summary_text(metrics: dict, report_uri: str, total: float | None = None) -> str:
    """The accuracy and trade-off tables and the verdict, as printed at the end of a run."""
    acc = {"zoo": metrics["accuracy"]["zoo"], "generated": metrics["accuracy"]["generated"]}
    if "generated_no_canon" in metrics["accuracy"]:
        acc["generated (no canon)"] = metrics["accuracy"]["generated_no_canon"]
    op = metrics["operating_point"]
    return ("\n" + accuracy_table(acc) + "\n\n" + tradeoff_table(metrics["tradeoff"]) +
            f"\n\nnovelty ratio {op['novelty']:.3f}; beats baselines at equal novelty: {op['accepted']}; "
            f"report: {report_uri}" + (f"; total {total:.1f} s" if total else ""))
