"""Every stage at thousands of models: `dwf run` of one preset at several zoo sizes, one run root each, and a table
per stage of time, the driver's peak resident memory, the object store's peak use and the bytes read, with how
each grows from one size to the next.

    python bench/scale_run.py [--preset mnist1d-mlp-scale] [--n 1000,3000,10000] [--root runs/scale]

Each size is its own run root (``<root>/n<N>``); a finished stage is skipped, so the bench resumes. Stage numbers
come from each stage's record (``<stage>/_SUCCESS``: seconds, driver_peak_rss_bytes, object_store_peak_bytes);
bytes read are the PCA actors' own counts, and for zoo/canon the size of the checkpoints they wrote/read.
Writes bench/results/scale_run.json and prints the table.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from dwf_ray import store
from dwf_ray.pipeline import STAGES, Pipeline
from dwf_ray.presets import preset

RESULTS = Path(__file__).parent / "results" / "scale_run.json"


def checkpoint_bytes(pipe: Pipeline, stage: str) -> int:
    man = pipe.store.manifest(stage)
    column = "canon_uri" if stage == "canon" else "uri"
    ok = man[man["status"] == "ok"]
    return int(sum(Path(u).stat().st_size for u in ok[column] if store.is_local(u)))


def stage_rows(pipe: Pipeline) -> dict:
    rows = {}
    for stage in STAGES:
        info = pipe.store.stage_info(stage.folder)
        row = {k: info.get(k) for k in ("seconds", "driver_peak_rss_bytes", "object_store_peak_bytes")}
        if stage.name in ("zoo", "canon"):
            row["bytes"] = checkpoint_bytes(pipe, stage.name)
        elif stage.name == "pca":
            meta = store.read_json(pipe.store.uri(stage.folder, "meta.json"))
            actors = meta.get("row_shards") or meta["shards"]      # the covariance side's actors are row shards
            row["bytes"] = int(sum(s.get("bytes_read", 0) for s in actors))
            row["k"], row["side"] = meta["k"], meta.get("side", "gram")
        rows[stage.name] = row
    return rows


def fmt_bytes(b) -> str:
    return "-" if b is None else f"{b / 2**20:,.0f} MiB"


def print_table(results: dict[int, dict]) -> None:
    sizes = sorted(results)
    for stage in (s.name for s in STAGES):
        print(f"\n[{stage}]  " + "  ".join(f"n={n}" for n in sizes))
        for key, show in (("seconds", lambda v: "-" if v is None else f"{v:,.1f} s"),
                          ("driver_peak_rss_bytes", fmt_bytes), ("object_store_peak_bytes", fmt_bytes),
                          ("bytes", fmt_bytes)):
            values = [results[n][stage].get(key) for n in sizes]
            growth = [f"x{b / a:.2f}" if a and b else "-" for a, b in zip(values, values[1:])]
            print(f"  {key:<24} " + " | ".join(show(v) for v in values) + "   growth " + " ".join(growth))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="mnist1d-mlp-scale")
    ap.add_argument("--n", default="1000,3000,10000")
    ap.add_argument("--root", default="runs/scale")
    ap.add_argument("--set", action="append", default=[], help="extra section.key=value overrides")
    args = ap.parse_args()
    results = {}
    for n in (int(v) for v in args.n.split(",")):
        cfg = preset(args.preset).with_overrides([f"zoo.n_models={n}", *args.set])
        pipe = Pipeline(f"{args.root}/n{n}", cfg, quiet=True)
        pipe.run()
        results[n] = stage_rows(pipe)
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(json.dumps({"preset": args.preset, "overrides": args.set, "runs": results}, indent=2))
    print_table(results)


if __name__ == "__main__":
    main()
