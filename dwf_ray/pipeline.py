"""The stages of a run, each restartable: a stage whose outputs are complete is skipped."""
from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
import ray

from dwf_ray import store
from dwf_ray.archs import ArchSpec
from dwf_ray.config import RunConfig
from dwf_ray.runtime import ensure_ray
from dwf_ray.store import RunStore
from dwf_ray.weights import WeightLayout, load_model_state

STAGES = ("zoo", "canon", "pca", "flow", "sample", "eval")
STAGE_DIRS = {"zoo": "zoo", "canon": "canonical", "pca": "pca", "flow": "flow", "sample": "samples", "eval": "report"}


class Pipeline:
    def __init__(self, root: str, cfg: RunConfig | None = None, restart_from: str | None = None,
                 zoo_root: str | None = None, log=print):
        self.store = RunStore(root)
        self.zoo_store = RunStore(zoo_root) if zoo_root else self.store
        self.log = log
        cfg_uri = self.store.uri("config.json")
        saved = RunConfig.model_validate(store.read_json(cfg_uri)) if store.exists(cfg_uri) else None
        if cfg is None:
            if saved is None:
                raise ValueError(f"{self.store.root}: no config.json in this run root; pass a preset")
            cfg = saved
        if restart_from:
            if restart_from not in STAGES:
                raise ValueError(f"unknown stage {restart_from!r}; stages: {', '.join(STAGES)}")
            for stage in STAGES[STAGES.index(restart_from):]:
                self.store.clear(STAGE_DIRS[stage])
                self.store.clear(f"nocanon/{STAGE_DIRS[stage]}")
        elif saved is not None and saved != cfg:
            raise ValueError(f"{self.store.root} was made with a different config; use another --name/--root, "
                             f"or --restart-from STAGE to redo that stage and the ones after it")
        self.cfg = cfg
        if saved != cfg:   # a finished root is opened without touching its files
            store.write_json(cfg_uri, cfg.model_dump())

    # -- helpers -------------------------------------------------------------------------
    @property
    def arch(self) -> ArchSpec:
        return ArchSpec.parse(self.cfg.zoo.arch)

    def _stage(self, name: str, fn) -> dict:
        folder = STAGE_DIRS[name]
        if self.store.done(folder):
            self.log(f"[{name}] complete in {self.store.uri(folder)}: skipped")
            return self.store.stage_info(folder)
        ensure_ray()
        self.log(f"[{name}] running")
        t0 = time.perf_counter()
        info = fn() or {}
        info["seconds"] = round(time.perf_counter() - t0, 2)
        self.store.mark_done(folder, info)
        self.log(f"[{name}] done in {info['seconds']:.1f} s: {json.dumps({k: v for k, v in info.items() if k != 'seconds'})}")
        return info

    def manifest(self, stage: str) -> pd.DataFrame:
        st = self.zoo_store if stage == "zoo" else self.store
        return store.read_table(st.uri(STAGE_DIRS[stage], "manifest.parquet"))

    def stage_seconds(self) -> dict[str, float]:
        return {s: self.store.stage_info(STAGE_DIRS[s])["seconds"] for s in STAGES[:-1] if self.store.done(STAGE_DIRS[s])}

    def canonical_models(self) -> tuple[pd.DataFrame, np.ndarray]:
        """The usable canonical models and their flat weights (n, d)."""
        man = self.manifest("canon")
        ok = man[man["status"] == "ok"].sort_values("model_id")
        layout = WeightLayout.from_arch(self.arch)
        flat = np.stack([layout.flatten(load_model_state(u, self.arch)[0]) for u in ok["canon_uri"]])
        return ok, flat

    # -- stages --------------------------------------------------------------------------
    def zoo(self) -> dict:
        def work():
            from dwf_ray.zoo import run_zoo
            check_arch_fits_data(self.arch, self.cfg.zoo)
            man = run_zoo(self.cfg.zoo, self.store.uri("zoo"))
            store.write_table(self.store.uri("zoo", "manifest.parquet"), man)
            return _counts(man) | {"test_acc_mean": float(man["test_acc"].mean())}
        return self._stage("zoo", work)

    def import_zoo(self, source: str) -> dict:
        def work():
            from dwf_ray.zoo import import_zoo
            man = import_zoo(source, self.arch, self.cfg.zoo.dataset, self.store.uri("zoo"))
            store.write_table(self.store.uri("zoo", "manifest.parquet"), man)
            return _counts(man) | {"source": source}
        return self._stage("zoo", work)

    def canon(self) -> dict:
        def work():
            from dwf_ray.canon.job import run_canon
            zoo_man = self.manifest("zoo")
            man = run_canon(zoo_man, self.cfg.canon, self.store.uri("canonical"), self.cfg.zoo)
            store.write_table(self.store.uri("canonical", "manifest.parquet"), man)
            info = _counts(man) | {"rows_in": len(zoo_man), "enabled": self.cfg.canon.enabled}
            ok = man[man["status"] == "ok"]
            info["dist_before_mean"] = float(ok["dist_before"].mean())
            info["dist_after_mean"] = float(ok["dist_after"].mean())
            for _, row in man[man["status"] != "ok"].iterrows():
                self.log(f"[canon] skipped {row['model_id']}: {row['error']}")
            if info["error"]:
                self.log(f"[canon] skipped {info['error']} of {len(man)} models (see canonical/manifest.parquet)")
            return info
        return self._stage("canon", work)

    def pca(self) -> dict:
        def work():
            from dwf_ray.pca.shards import fit_distributed_pca
            man = self.manifest("canon")
            ok = man[man["status"] == "ok"].sort_values("model_id")
            meta = fit_distributed_pca(list(ok["canon_uri"]), list(ok["model_id"]), WeightLayout.from_arch(self.arch),
                                       self.cfg.pca, self.store.uri("pca"))
            return {"n": meta["n"], "d": meta["d"], "k": meta["k"],
                    "explained_variance_total": meta["explained_variance_total"]}
        return self._stage("pca", work)

    def flow(self) -> dict:
        def work():
            from dwf_ray.flow.train import run_flow
            from dwf_ray.pca.shards import PCAModel
            z = PCAModel.load_latents(self.store.uri("pca"))
            info = run_flow(z, self.cfg.flow, self.store.uri("flow"))
            return {k: v for k, v in info.items() if k != "history"}
        return self._stage("flow", work)

    def sample(self) -> dict:
        def work():
            from dwf_ray.flow.sample import generate, write_samples
            sc = self.cfg.sample
            gpus = 1 if self.cfg.flow.resolved_use_gpu() else 0
            flat = ray.get(ray.remote(generate).options(num_gpus=gpus).remote(
                self.store.uri("flow", "model.pt"), self.store.uri("pca"), sc.n, sc.temperature, sc.solver,
                sc.steps, sc.seed))
            man = write_samples(flat, WeightLayout.from_arch(self.arch), self.arch, self.store.uri("samples"))
            store.write_table(self.store.uri("samples", "manifest.parquet"), man)
            return {"n": len(man)}
        return self._stage("sample", work)

    def no_canon_variant(self) -> "Pipeline":
        """The same run without canonicalization, under <root>/nocanon, sharing this run's zoo."""
        cfg = self.cfg.model_copy(deep=True)
        cfg.canon.enabled = False
        sub = Pipeline(self.store.uri("nocanon"), cfg, zoo_root=self.zoo_store.root, log=self.log)
        for stage in ("canon", "pca", "flow", "sample"):
            getattr(sub, stage)()
        return sub

    def eval(self) -> dict:
        def work():
            from dwf_ray.eval.report import write_report
            from dwf_ray.eval.run import evaluate
            ok, zoo_flat = self.canonical_models()
            layout = WeightLayout.from_arch(self.arch)
            gen = self.manifest("sample")
            gen_flat = np.stack([layout.flatten(load_model_state(u, self.arch)[0]) for u in gen["uri"]])
            ref_id = ok["reference_id"].iloc[0]
            reference = zoo_flat[list(ok["model_id"]).index(ref_id)]
            no_canon, sub = None, None
            if self.cfg.eval.compare_no_canon and self.cfg.canon.enabled:
                sub = self.no_canon_variant()
                nc = sub.manifest("sample")
                no_canon = np.stack([layout.flatten(load_model_state(u, self.arch)[0]) for u in nc["uri"]])
            metrics, accs = evaluate(self.cfg, self.arch, zoo_flat, gen_flat, self.store.uri("flow", "model.pt"),
                                     self.store.uri("pca"), reference, no_canon)
            metrics["root"] = self.store.root
            metrics["timings"] = self.stage_seconds()
            if sub is not None:
                metrics["timings"].update({f"{k} (no canon)": v for k, v in sub.stage_seconds().items()})
            metrics["counts"] = {s: self.store.stage_info(STAGE_DIRS[s]) for s in ("zoo", "canon")
                                 if self.store.done(STAGE_DIRS[s])}
            write_report(self.store.uri("report"), metrics, accs["zoo"], accs["generated"])
            return {"zoo_acc": metrics["accuracy"]["zoo"]["mean"], "gen_acc": metrics["accuracy"]["generated"]["mean"],
                    "novelty": metrics["diversity"]["novelty_ratio"], "accepted": metrics["operating_point"]["accepted"]}
        info = self._stage("eval", work)
        return info

    def run(self, stages=STAGES) -> dict:
        t0 = time.perf_counter()
        for s in stages:
            getattr(self, s)()
        total = time.perf_counter() - t0
        if "eval" in stages:
            self.print_summary(total)
        return {"seconds": total}

    def print_summary(self, total: float | None = None) -> None:
        from dwf_ray.eval.report import accuracy_table, tradeoff_table
        m = store.read_json(self.store.uri("report", "metrics.json"))
        acc = {"zoo": m["accuracy"]["zoo"], "generated": m["accuracy"]["generated"]}
        if "generated_no_canon" in m["accuracy"]:
            acc["generated (no canon)"] = m["accuracy"]["generated_no_canon"]
        self.log("\n" + accuracy_table(acc) + "\n\n" + tradeoff_table(m["tradeoff"]))
        op = m["operating_point"]
        self.log(f"\nnovelty ratio {op['novelty']:.3f}; beats baselines at equal novelty: {op['accepted']}; "
                 f"report: {self.store.uri('report', 'report.md')}" + (f"; total {total:.1f} s" if total else ""))


def check_arch_fits_data(arch: ArchSpec, zoo_cfg) -> None:
    """Load the dataset once (a missing file fails here, naming it) and run the model on two training examples:
    a model that does not take the dataset's inputs or classes fails before any zoo task starts."""
    import torch
    from dwf_ray.archs import build_model
    from dwf_ray.data import dataset_for
    data = dataset_for(zoo_cfg)
    model = build_model(arch).eval()
    where = f"arch {arch.to_json()} on dataset {zoo_cfg.dataset!r}"
    vocab = arch.args.get("vocab_size")
    if data.vocab_size is not None and (vocab is None or vocab < data.vocab_size):
        raise ValueError(f"{where}: the tokenizer has {data.vocab_size} tokens but the model's vocab_size is {vocab}")
    try:
        with torch.no_grad():
            out = model(data.train.x[:2])
    except Exception as exc:  # shape errors come from deep inside the model
        raise ValueError(f"{where}: the model does not take inputs of shape {tuple(data.train.x.shape[1:])} "
                         f"({type(exc).__name__}: {exc})") from exc
    if tuple(out.shape) != (2, data.n_classes):
        raise ValueError(f"{where}: the model outputs {tuple(out.shape[1:])} values per example, "
                         f"the dataset has {data.n_classes} classes")


def _counts(man: pd.DataFrame) -> dict:
    return {"rows": len(man), "ok": int((man["status"] == "ok").sum()), "error": int((man["status"] != "ok").sum())}
