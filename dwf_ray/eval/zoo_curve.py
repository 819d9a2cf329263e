"""Where a run's zoo sits on the quality-against-zoo-size curve measured for its preset.

The curves (``zoo_curves.json`` beside this file) are written by ``bench/zoo_scaling.py --save-curve``: for a preset,
the operating point of the first n models of one zoo, at several n, run with the preset's own settings. A run of
that preset gets a section in its report placing its own operating point among them, and a plot
(``zoo_curve.png``)."""
from __future__ import annotations

import json
from pathlib import Path

CURVES = Path(__file__).with_name("zoo_curves.json")
FIELDS = ("n", "zoo_acc", "acc", "func_novelty", "margin", "margin_se", "best_baseline")


def measured_curve(preset: str, path: Path | None = None) -> dict | None:
    """The curve measured for ``preset`` ({"about": ..., "points": [...]} with points sorted by n), or None."""
    path = path or CURVES
    if not path.exists():
        return None
    curve = json.loads(path.read_text()).get(preset)
    if curve:
        curve = {**curve, "points": sorted(curve["points"], key=lambda p: p["n"])}
    return curve


def save_curve(preset: str, about: str, points: list[dict], path: Path | None = None) -> None:
    """Stores ``points`` (each with ``FIELDS``) as ``preset``'s curve, keeping the other presets' curves."""
    path = path or CURVES
    curves = json.loads(path.read_text()) if path.exists() else {}
    curves[preset] = {"about": about, "points": [{k: p[k] for k in FIELDS} for p in sorted(points, key=lambda p: p["n"])]}
    path.write_text(json.dumps(curves, indent=1) + "\n")


def place(curve: dict, n: int) -> str:
    """Where a zoo of ``n`` models falls among the curve's sizes, in words."""
    sizes = [p["n"] for p in curve["points"]]
    if n in sizes:
        return f"n = {n:,} is one of the measured sizes"
    below, above = [s for s in sizes if s < n], [s for s in sizes if s > n]
    if below and above:
        return f"n = {n:,} lies between the measured sizes {below[-1]:,} and {above[0]:,}"
    return f"n = {n:,} lies {'above' if below else 'below'} the measured sizes ({sizes[0]:,} to {sizes[-1]:,})"


def curve_section(preset: str, curve: dict, n: int, operating: dict, zoo_acc: float) -> str:
    """Markdown: the measured curve as a table with this run's row placed by n, and the plot."""
    this = {"n": n, "zoo_acc": zoo_acc, "this": True, **{k: operating[k] for k in FIELDS[2:]}}
    rows = sorted([*curve["points"], this], key=lambda p: (p["n"], p.get("this", False)))
    lines = [f"| {'**this run**' if p.get('this') else 'measured'} | {p['n']:,} | {p['zoo_acc']:.2f} | {p['acc']:.2f} | "
             f"{p['func_novelty']:.2f} | {p['margin']:+.2f} ({p['margin_se']:.2f}) | {p['best_baseline']} |"
             for p in rows]
    return f"""## Where this zoo sits on the measured curve

The preset `{preset}` has a measured curve of quality against zoo size ({curve['about']}); {place(curve, n)}.
Each row is an operating point: its accuracy, functional novelty and margin over the best baseline there.

| | zoo size n | zoo % | generated % | functional novelty | margin (SE) | best baseline |
|---|---|---|---|---|---|---|
""" + "\n".join(lines) + "\n\n![this run on the measured curve](zoo_curve.png)\n"


def plot_curve(curve: dict, n: int, operating: dict) -> bytes:
    """Margin over the best baseline against zoo size (log scale), with 2-standard-error bars; this run a star."""
    from dwf_ray.eval.report import pyplot, png_bytes
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    pts = curve["points"]
    ax.errorbar([p["n"] for p in pts], [p["margin"] for p in pts], yerr=[2 * p["margin_se"] for p in pts],
                marker="o", capsize=3, label="measured (2 SE)")
    ax.errorbar([n], [operating["margin"]], yerr=[2 * operating["margin_se"]], marker="*", markersize=14,
                color="tab:red", capsize=3, linestyle="none", label="this run")
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("zoo size n (models)")
    ax.set_ylabel("margin over best baseline (points)")
    ax.legend(fontsize=7)
    data = png_bytes(fig)
    plt.close(fig)
    return data
