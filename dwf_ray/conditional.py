"""One flow for several zoos: a class-conditional flow with classifier-free guidance.

Each class is a run root whose canon and pca stages are complete; it keeps its own architecture and PCA.
Each zoo's latents are standardised on their own and cut to the smallest k of the zoos; one flow is trained
on the union with the zoo index as label (Ray Train, the pipeline's flow loop). A class's samples are decoded
with that zoo's PCA and scored against that zoo: test accuracy and functional novelty, beside the baselines
(eval/baselines.py) at equal functional novelty. Output root::

    config.json, flow/model.pt, flow/classes.json, samples/<class>/w<w>/*.safetensors + manifest.parquet,
    report/metrics.json, report/report.md
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from dwf_ray import store
from dwf_ray.archs import ArchSpec
from dwf_ray.canon.job import load_canonical
from dwf_ray.config import FlowConfig, RunConfig, SampleConfig
from dwf_ray.eval.baselines import baseline_sets
from dwf_ray.eval.diversity import zoo_nn_median
from dwf_ray.eval.metrics import NOVELTY
from dwf_ray.eval.judge import ScoredSet, ZooJudge, judge_sets
from dwf_ray.eval.report import summary, write_report_files
from dwf_ray.eval.tradeoff import GENERATOR
from dwf_ray.flow.checkpoint import LatentScaler
from dwf_ray.flow.train import train_flow
from dwf_ray.pca.model import PCAModel
from dwf_ray.runtime import ensure_ray
from dwf_ray.sample.generator import Generator
from dwf_ray.store import CONFIG, STAGE_FOLDERS, RunStore
from dwf_ray.weights import WeightLayout, load_flat_models


class ConditionalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    roots: list[str]                 # one run root per class, in label order
    names: Optional[list[str]] = None   # class names (default: the roots' folder names)
    flow: FlowConfig = Field(default_factory=FlowConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    guidance: list[float] = [0.0, 1.0, 2.0]   # w: 0 = unconditional, 1 = conditional, > 1 = guided
    baselines: bool = True           # also score the noise and interpolation baselines of each zoo

    def class_names(self) -> list[str]:
        names = self.names or [r.rstrip("/").rsplit("/", 1)[-1] for r in self.roots]
        if len(self.roots) < 2:
            raise ValueError(f"a conditional flow needs at least two run roots, got {self.roots}")
        if len(names) != len(self.roots) or len(set(names)) != len(names):
            raise ValueError(f"class names {names} must be unique, one per run root {self.roots}")
        return names

    def with_overrides(self, overrides: list[str]) -> "ConditionalConfig":
        """``flow.key=value`` and ``sample.key=value`` overrides, parsed as in RunConfig.with_overrides."""
        bad = [o for o in overrides if not o.startswith(("flow.", "sample."))]
        if bad:
            raise ValueError(f"overrides {bad}: a conditional run only takes flow.* and sample.* keys")
        run = RunConfig(flow=self.flow, sample=self.sample).with_overrides(overrides)
        return self.model_copy(update={"flow": run.flow, "sample": run.sample})


@dataclass
class ZooClass:
    """One class: its run root, config, PCA and latents."""
    name: str
    run_store: RunStore
    cfg: RunConfig
    pca: PCAModel
    z: np.ndarray

    @property
    def arch(self) -> ArchSpec:
        return ArchSpec.parse(self.cfg.zoo.arch)

    @classmethod
    def load(cls, name: str, root: str) -> "ZooClass":
        run_store = RunStore(root)
        if not store.exists(run_store.uri(CONFIG)):
            raise ValueError(f"{run_store.root}: no config.json in this run root")
        for stage in ("canon", "pca"):
            if not run_store.done(STAGE_FOLDERS[stage]):
                raise ValueError(f"{run_store.root}: the {stage} stage is not complete; run `dwf run` or "
                                 f"`dwf {stage}` on it first")
        cfg = run_store.saved_config(RunConfig)
        pca_dir = run_store.uri("pca")
        return cls(name, run_store, cfg, PCAModel.load(pca_dir), PCAModel.load_latents(pca_dir))


def _w_key(w: float) -> str:
    return f"w{w:g}"


def train_conditional(classes: list[ZooClass], cfg: ConditionalConfig, out: RunStore) -> dict:
    """Standardise each zoo's latents, train the labelled flow, write flow/model.pt and flow/classes.json."""
    k = min(c.z.shape[1] for c in classes)
    scalers = [LatentScaler.fit(c.z[:, :k], cfg.flow.scaling) for c in classes]
    u = np.concatenate([s.transform(c.z[:, :k]) for s, c in zip(scalers, classes)]).astype(np.float32)
    labels = np.concatenate([np.full(len(c.z), i) for i, c in enumerate(classes)])
    info = train_flow(u, cfg.flow.model_copy(update={"scaling": "none"}), out.uri("flow"), labels=labels)
    store.write_json(out.uri("flow", "classes.json"), {"k": k, "classes": [
        {"name": c.name, "root": c.run_store.root, "n": len(c.z), "mean": s.mean.tolist(), "scale": s.scale.tolist()}
        for c, s in zip(classes, scalers)]})
    return {key: v for key, v in info.items() if key != "history"} | {"k": k}


def evaluate_class(c: ZooClass, generated: dict[str, np.ndarray], baselines: bool) -> dict:
    """Accuracy, functional novelty and the margin over the best baseline of each generated set against the
    class's own zoo."""
    _, zoo = load_canonical(c.cfg, c.run_store)
    eval_cfg = c.cfg.eval
    sets = [ScoredSet(key, GENERATOR, key, lambda zoo, flat=flat: flat, len(flat))
            for key, flat in generated.items()]
    if baselines:
        sets += [ScoredSet(b.key, b.method, b.setting, b.build, eval_cfg.n_baseline)
                 for b in baseline_sets(len(zoo), WeightLayout.from_arch(c.arch), eval_cfg, zoo_nn_median(zoo))]
    judge = ZooJudge(c.arch, c.cfg, zoo)
    points, results = judge_sets(judge, sets)
    rows = {p["key"]: {"accuracy": summary(results[p["key"]].acc),
                       **{k: p.get(k) for k in (NOVELTY, "similarity", "distinct_nearest", "best_baseline", "margin",
                                                "margin_se")}}
            for p in points if p["method"] == GENERATOR}
    return {"zoo": summary(judge.result.acc), "generated": rows,
            "baselines": [p for p in points if p["method"] != GENERATOR]}


def report_table(metrics: dict) -> str:
    lines = ["| class | models | mean acc % | std | min | max | functional novelty | S | vs best baseline (SE) "
             "| distinct NN |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in metrics["classes"].items():
        z = m["zoo"]
        lines.append(f"| {name} | zoo | {z['mean']:.2f} | {z['std']:.2f} | {z['min']:.2f} | {z['max']:.2f} "
                     f"| 1.000 | - | - | - |")
        for key, row in m["generated"].items():
            a = row["accuracy"]
            margin = (f"{row['margin']:+.2f} ({row['margin_se']:.2f}) vs {row['best_baseline']}"
                      if row.get("margin") is not None else "-")
            lines.append(f"| {name} | w={key[1:]} | {a['mean']:.2f} | {a['std']:.2f} | {a['min']:.2f} | {a['max']:.2f} "
                         f"| {row[NOVELTY]:.3f} | {row['similarity']:.3f} | {margin} | {row['distinct_nearest']:.0f} |")
    return "\n".join(lines)


def run_conditional(cfg: ConditionalConfig, out_root: str, log=print) -> dict:
    """Train, sample every class at every guidance scale, evaluate; stages already complete are skipped."""
    names = cfg.class_names()
    out = RunStore(out_root)
    saved = out.saved_config(ConditionalConfig)
    if saved is not None and saved != cfg:
        raise ValueError(f"{out.root} was made with a different conditional config; use another output root")
    out.save_config(cfg)
    ensure_ray()
    classes = [ZooClass.load(n, r) for n, r in zip(names, cfg.roots)]
    if out.info_if_done("flow", "conditional flow", log) is None:
        log(f"[conditional flow] training on {', '.join(f'{c.name} ({len(c.z)})' for c in classes)}")
        out.mark_done("flow", train_conditional(classes, cfg, out))
    spec = store.read_json(out.uri("flow", "classes.json"))
    gen, sampling = Generator.load(out.root), cfg.sample
    metrics = {"k": spec["k"], "flow": out.stage_info("flow"), "classes": {}}
    for label, c in enumerate(classes):
        generated = {}
        for w in cfg.guidance:
            folder = f"samples/{c.name}/{_w_key(w)}"
            if not out.done(folder):
                flat = gen(sampling.n, sampling.temperature, sampling.seed, sampling.solver, sampling.steps,
                           label=label, guidance=w)
                out.mark_done(folder, {"n": len(gen.write(out.uri(folder), flat, label)), "guidance": w})
            generated[_w_key(w)] = load_flat_models(store.read_table(out.uri(folder, "manifest.parquet"))["uri"],
                                                    c.arch)
        log(f"[conditional eval] {c.name}: scoring {len(generated)} generated sets against its zoo")
        metrics["classes"][c.name] = evaluate_class(c, generated, cfg.baselines)
    table = report_table(metrics)
    write_report_files(out.uri("report"), metrics, (
        f"# Conditional flow over {len(classes)} zoos\n\nOne flow, k = {spec['k']}; guidance "
        f"v = v_uncond + w (v_cond - v_uncond). Functional novelty: median disagreement with the nearest zoo "
        f"model / the zoo's own median; S: max IoU of wrong predictions with a zoo model; baselines interpolated "
        f"to the same functional novelty.\n\n{table}\n"))
    log("\n" + table)
    return metrics
