"""The stages of a run, driven by one table; each stage is restartable and skipped when its outputs are complete.

Every stage is a function ``dwf_ray/<stage>/stage.py: run_<stage>(cfg: RunConfig, run_store: RunStore) -> info``,
writing its own folder under the run root; the pipeline checks the config, restarts, skips, times and logs them.
A variant (the run without canonicalization that the report compares against) is the same table run again under
a sub-folder with one config change, before the stage that reads it.
"""
from __future__ import annotations

import importlib
import os
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

from dwf_ray import store
from dwf_ray.config import RunConfig
from dwf_ray.lease import lease_for
from dwf_ray.resources import StageMeter
from dwf_ray.runtime import ensure_ray
from dwf_ray.runtime.logs import quiet_logs
from dwf_ray.store import NO_CANON, STAGE_FOLDERS, RunStore


@dataclass(frozen=True)
class Variant:
    """A sub-run under ``<root>/<folder>`` that shares the run's zoo, redoes ``stages`` with ``config(cfg)``, and
    is run before the stage that lists it when ``applies(cfg)``."""
    folder: str
    stages: tuple[str, ...]
    applies: Callable[[RunConfig], bool]
    config: Callable[[RunConfig], RunConfig]


def _without_canon(cfg: RunConfig) -> RunConfig:
    cfg = cfg.model_copy(deep=True)
    cfg.canon.enabled = False
    return cfg


NO_CANON_VARIANT = Variant(NO_CANON, ("canon", "pca", "flow", "sample"), applies=lambda cfg: cfg.compares_no_canon,
                           config=_without_canon)


@dataclass(frozen=True)
class Stage:
    name: str
    variants: tuple[Variant, ...] = ()     # sub-runs this stage reads, run before it

    @property
    def folder(self) -> str:
        return STAGE_FOLDERS[self.name]

    def load(self) -> Callable[[RunConfig, RunStore], dict]:
        """``dwf_ray.<name>.stage:run_<name>``, imported when the stage runs (the CLI starts fast)."""
        return getattr(importlib.import_module(f"dwf_ray.{self.name}.stage"), f"run_{self.name}")


STAGES = (Stage("zoo"), Stage("canon"), Stage("pca"), Stage("flow"), Stage("sample"),
          Stage("eval", variants=(NO_CANON_VARIANT,)))
STAGE_NAMES = tuple(s.name for s in STAGES)
VARIANTS = tuple(dict.fromkeys(v for s in STAGES for v in s.variants))
_BY_NAME = {s.name: s for s in STAGES}


class StageFailed(RuntimeError):
    """A stage that raised: one line naming the stage and the cause; the traceback is in the run's log."""


def check_sizes(cfg: RunConfig) -> None:
    """What can be checked before any work: the dataset's arguments, how the zoo is grouped into tasks, and
    whether a zoo of ``zoo.n_models`` fits the PCA's memory budget (a ValueError naming the key)."""
    from dwf_ray.archs import ArchSpec
    from dwf_ray.archs.cnn import build_on_meta
    from dwf_ray.pca.shards import check_fits
    from dwf_ray.weights import WeightLayout
    from dwf_ray.zoo import check_zoo_config
    check_zoo_config(cfg.zoo)
    d = WeightLayout.from_module(build_on_meta(ArchSpec.parse(cfg.zoo.arch))).size   # shapes only, no weights
    try:
        check_fits(cfg.zoo.n_models, d, cfg.pca)
    except ValueError as exc:
        raise ValueError(f"zoo.n_models={cfg.zoo.n_models} (d={d:,} parameters) does not fit "
                         f"pca.memory_budget_bytes={cfg.pca.memory_budget_bytes}: {exc}") from None


class Pipeline:
    def __init__(self, root: str, cfg: RunConfig | None = None, restart_from: str | None = None,
                 zoo_root: str | None = None, log=print, quiet: bool = False):
        """``quiet``: Ray's and the libraries' log lines go to <root>/logs/dwf.log instead of the terminal."""
        self.store = RunStore(root, zoo_root)
        self.log, self.quiet = log, quiet
        self._lease, self._holds = lease_for(self.store.root), 0
        saved = self.store.saved_config(RunConfig)
        if cfg is None:
            if saved is None:
                raise ValueError(f"{self.store.root}: no config.json in this run root; pass a preset")
            cfg = saved
        if restart_from:
            if restart_from not in STAGE_NAMES:
                raise ValueError(f"unknown stage {restart_from!r}; stages: {', '.join(STAGE_NAMES)}")
        elif saved is not None and saved != cfg:
            raise ValueError(f"{self.store.root} was made with a different config; use another --name/--root, "
                             f"or --restart-from STAGE to redo that stage and the ones after it")
        check_sizes(cfg)
        self.cfg = cfg
        if restart_from or saved != cfg:   # a finished root is opened without touching its files (or the lease)
            with self.holding():
                for stage in STAGES[STAGE_NAMES.index(restart_from):] if restart_from else ():
                    self.store.clear(stage.folder)
                    for variant in VARIANTS:
                        self.store.clear(f"{variant.folder}/{stage.folder}")
                self.store.save_config(cfg)

    @contextmanager
    def holding(self):
        """This run holds its root while the block runs (nested blocks share one lease); another live run
        holding it is a RootHeld error naming it (dwf_ray/lease.py)."""
        if self._holds == 0:
            self._lease.acquire()
        self._holds += 1
        try:
            yield
        finally:
            self._holds -= 1
            if self._holds == 0:
                self._lease.release()

    @property
    def arch(self):
        from dwf_ray.archs import ArchSpec
        return ArchSpec.parse(self.cfg.zoo.arch)

    def run_stage(self, name: str, function: Callable[[RunConfig, RunStore], dict] | None = None) -> dict:
        """Run one stage (``function`` replaces the table's, e.g. importing a zoo), unless it is complete."""
        stage = _BY_NAME[name]
        if (info := self.store.info_if_done(stage.folder, name, self.log)) is not None:
            return info
        with self.holding():
            return self._run_held(stage, function)

    def _run_held(self, stage: Stage, function: Callable[[RunConfig, RunStore], dict] | None) -> dict:
        name = stage.name
        try:
            with self.logs():
                ensure_ray(quiet=self.quiet)
                for variant in stage.variants:
                    if variant.applies(self.cfg):
                        self.run_variant(variant)
                self.log(f"[{name}] running")
                t0 = time.perf_counter()
                with StageMeter() as meter:
                    info = (function or stage.load())(self.cfg, self.store)
        except (StageFailed, store.StoreError, FileNotFoundError, PermissionError) as exc:   # one line already
            self.append_log("".join(traceback.format_exception(exc)))
            raise
        except Exception as exc:
            raise self._failed(name, exc) from exc
        info["seconds"] = round(time.perf_counter() - t0, 2)
        info |= meter.result()
        self._lease.check()
        self.store.mark_done(stage.folder, info)
        self._log_errors(name, info)
        self.log(f"[{name}] done in {info['seconds']:.1f} s")
        return info

    @contextmanager
    def logs(self):
        """While a stage runs: in quiet mode, log lines go to logs/dwf.log in the run root (appended; on S3 the
        object is rewritten after the stage)."""
        if not self.quiet:
            yield
            return
        uri = self.store.uri("logs", "dwf.log")
        local = store.is_local(uri)
        path = uri if local else os.path.join(tempfile.mkdtemp(prefix="dwf-log-"), "dwf.log")
        try:
            with quiet_logs(path):
                yield
        finally:
            if not local:
                with open(path, "rb") as f:
                    self.append_log(f.read().decode(errors="replace"))

    def _failed(self, name: str, exc: Exception) -> StageFailed:
        """The traceback of a stage's exception goes to the run's log; the one line names the stage and cause."""
        log_uri = self.append_log(f"[{name}] failed\n" + "".join(traceback.format_exception(exc)))
        cause = getattr(exc, "cause", None) or exc        # a Ray task's error carries the task's own exception
        first = next((line for line in str(cause).splitlines() if line.strip()), "")
        return StageFailed(f"stage {name} failed: {type(cause).__name__}{': ' + first if first else ''} "
                           f"(traceback in {log_uri}; rerun the same command to resume)")

    def append_log(self, text: str) -> str:
        """Append ``text`` to <root>/logs/dwf.log (on S3 the object is rewritten); its URI."""
        uri = self.store.uri("logs", "dwf.log")
        if store.is_local(uri):
            os.makedirs(os.path.dirname(uri), exist_ok=True)
            with open(uri, "a") as f:
                f.write(text)
        else:
            store.write_bytes(uri, (store.read_bytes(uri) if store.exists(uri) else b"") + text.encode())
        return uri

    def _log_errors(self, name: str, info: dict) -> None:
        """Rows that a stage kept as errors, each with its reason (the manifest has them too)."""
        if not info.get("error"):
            return
        manifest = self.store.manifest(name)
        for _, row in manifest[manifest["status"] != "ok"].iterrows():
            self.log(f"[{name}] skipped {row['model_id']}: {row['error']}")
        self.log(f"[{name}] skipped {info['error']} of {len(manifest)} models "
                 f"(see {STAGE_FOLDERS[name]}/manifest.parquet)")

    def import_zoo(self, source: str) -> dict:
        from dwf_ray.zoo.stage import run_import
        return self.run_stage("zoo", lambda cfg, run_store: run_import(cfg, run_store, source))

    def run_variant(self, variant: Variant) -> "Pipeline":
        """A variant's sub-run under <root>/<variant.folder>, sharing this run's zoo."""
        sub = Pipeline(self.store.uri(variant.folder), variant.config(self.cfg), zoo_root=self.store.zoo_root,
                       log=self.log, quiet=self.quiet)
        for stage in variant.stages:
            sub.run_stage(stage)
        return sub

    def run(self, stages=STAGE_NAMES) -> dict:
        t0 = time.perf_counter()
        with self.holding():
            for name in stages:
                self.run_stage(name)
        total = time.perf_counter() - t0
        if "eval" in stages:
            self.print_summary(total)
        return {"seconds": total}

    def print_summary(self, total: float | None = None) -> None:
        from dwf_ray.eval.report import summary_text
        metrics = store.read_json(self.store.uri("report", "metrics.json"))
        self.log(summary_text(metrics, self.store.uri("report", "report.md"), total))
