"""The canon job: every zoo model canonicalized onto the reference with Ray Data and an actor pool (the canon
stage is ``canon/stage.py``; one model is moved by ``canon/align.py``).

The job streams: the driver holds only manifest rows; each actor reads one checkpoint at a time, matches it
and writes the result. Every input row gives exactly one output row; a row that fails keeps its error.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import ray

from dwf_ray import store
from dwf_ray.archs import ArchSpec
from dwf_ray.canon.activations import ActivationMatcher, check_supported
from dwf_ray.canon.align import Aligner
from dwf_ray.canon.matching import distance
from dwf_ray.config import CanonConfig, RunConfig, ZooConfig
from dwf_ray.data import dataset_for
from dwf_ray.runtime.data import row_blocks, rows_with_progress
from dwf_ray.runtime.progress import on_driver_node
from dwf_ray.store import RunStore
from dwf_ray.weights import (CheckpointError, error_row, load_flat_models, load_model_state, row_error,
                             save_checkpoint)

_RESULT_COLUMNS = ["canon_uri", "dist_before", "dist_after"]
_NO_RESULT = {"canon_uri": "", "dist_before": np.nan, "dist_after": np.nan}


@ray.remote(num_cpus=0)
class AttemptLedger:
    """Starts that never finished, per row. Ray Data restarts a pool actor that dies and reruns its batch
    without limit; a row whose worker dies every time is given up on through these counts.

    A batch is first run with one call for all its rows (``start_batch``). A row that was in a batch whose
    worker died is from then on run one row at a time (``start_row``), so that the row that kills the worker is
    the only one counted against the limit.
    """

    def __init__(self):
        self.in_batch: dict[str, int] = {}
        self.alone: dict[str, int] = {}

    def start_batch(self, keys: list[str]) -> bool:
        """Count a start of every row; False if one of them was in a batch that never finished."""
        clean = not any(k in self.in_batch for k in keys)
        for k in keys:
            self.in_batch[k] = self.in_batch.get(k, 0) + 1
        return clean

    def start_row(self, key: str) -> int:
        """Count a start of one row on its own; returns its earlier starts on its own that never finished."""
        earlier = self.alone.get(key, 0)
        self.alone[key] = earlier + 1
        return earlier

    def finish(self, keys: list[str]) -> None:
        for k in keys:
            self.in_batch.pop(k, None)
            self.alone.pop(k, None)


class Canonicalizer:
    """Ray Data actor: loads the reference once, then matches each checkpoint of its batches onto it."""

    def __init__(self, ref_uri: str, arch_json: str, out_dir: str, cfg_json: str,
                 activation_inputs: np.ndarray | None = None, ledger=None):
        import torch
        torch.set_num_threads(1)
        self.arch = ArchSpec.from_json(arch_json)
        self.cfg = CanonConfig.model_validate_json(cfg_json)
        self.aligner = Aligner(self.arch, self.cfg.residual, self.cfg.max_iter, self.cfg.seed)
        self.param_names = self.aligner.layout.names
        ref, _ = load_model_state(ref_uri, self.arch)
        self.ref = {k: ref[k] for k in self.param_names}
        self.out_dir, self.ledger = out_dir, ledger
        self.by_activations = None
        if activation_inputs is not None:
            self.by_activations = ActivationMatcher(self.arch, ref, torch.as_tensor(activation_inputs))

    def canonicalize_row(self, row: dict) -> dict:
        """One usable row: its checkpoint matched onto the reference and written; the result columns."""
        state, _ = load_model_state(row["uri"], self.arch)
        if self.by_activations is not None:
            out, _ = self.by_activations(state)
        elif self.cfg.enabled:
            out = self.aligner.onto(self.ref, state)
        else:
            out = state
        uri = store.join(self.out_dir, f"{row['model_id']}.safetensors")
        save_checkpoint(uri, out, self.arch, extra={"source": row["uri"]})
        return {"canon_uri": uri, "dist_before": distance(self.ref, state, self.param_names),
                "dist_after": distance(self.ref, out, self.param_names)}

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        records = batch.to_dict("records")
        keys = [r["model_id"] for r in records if r["status"] == "ok"]
        one_by_one = self.ledger is not None and not ray.get(self.ledger.start_batch.remote(keys))
        rows = []
        for row in records:
            if row["status"] != "ok":
                rows.append(row | _NO_RESULT)
                continue
            died = ray.get(self.ledger.start_row.remote(row["model_id"])) if one_by_one else 0
            if died > self.cfg.max_retries:
                rows.append(error_row(row, f"{row['uri']}: the worker process died each time it canonicalized this "
                                           f"checkpoint ({died + 1} attempts); is it too large for the worker's memory?",
                                      **_NO_RESULT))
            else:
                try:
                    rows.append(row | self.canonicalize_row(row))
                except Exception as exc:             # whatever goes wrong with one model stays in its row
                    rows.append(error_row(row, row_error(row["uri"], exc), **_NO_RESULT))
            if one_by_one:
                self.ledger.finish.remote([row["model_id"]])
        if self.ledger is not None and not one_by_one:
            self.ledger.finish.remote(keys)
        return pd.DataFrame(rows, columns=list(batch.columns) + _RESULT_COLUMNS)


def remove_partial_writes(out_dir: str) -> int:
    """Delete temp files of writes that never finished (a worker killed mid-write); returns how many.

    ``store.write_bytes`` writes a local file under a ``.tmp-`` name and renames it when complete; an S3 object
    appears only once its upload completes, so there is nothing to clean there.
    """
    if not store.is_local(out_dir) or not store.exists(out_dir):
        return 0
    leftovers = [u for u in store.list_files(out_dir) if ".tmp-" in u.rsplit("/", 1)[-1]]
    for uri in leftovers:
        store.remove(uri)
    return len(leftovers)


def _reference_row(manifest: pd.DataFrame, cfg: CanonConfig) -> pd.Series:
    ok = store.ok_rows(manifest)
    if ok.empty:
        raise ValueError("canonicalize: no usable models in the zoo manifest")
    if cfg.reference >= len(ok):
        raise ValueError(f"canonicalize: reference index {cfg.reference} but only {len(ok)} usable models")
    ref_row = ok.iloc[cfg.reference]
    try:
        load_model_state(ref_row["uri"], ArchSpec.from_json(ref_row["arch"]))
    except CheckpointError as exc:
        raise ValueError(f"canonicalize: the reference model is unusable: {exc}") from exc
    return ref_row


def canonicalize_manifest(manifest: pd.DataFrame, cfg: CanonConfig, out_dir: str,
                          zoo: ZooConfig | None = None) -> pd.DataFrame:
    """Canonicalize every usable model of a zoo manifest into ``out_dir``; one output row per input row.

    ``zoo`` names the training data that ``cfg.method="activations"`` runs the models on; the driver loads
    the first ``cfg.activation_samples`` training inputs and hands them to the actors.

    The actor pool grows from ``cfg.min_actors`` to ``cfg.max_actors`` (None: as far as the cluster allows);
    actors given GPUs (``cfg.actor_gpus``) match on them. Ray Data shows the progress.
    """
    if manifest["model_id"].duplicated().any():
        raise ValueError("canonicalize: the zoo manifest has duplicate model_id values")
    ref_row = _reference_row(manifest, cfg)
    activation_inputs = None
    if cfg.enabled and cfg.method == "activations":
        if zoo is None:
            raise ValueError("canonicalize: canon.method=activations needs the zoo's dataset (the ZooConfig)")
        check_supported(ArchSpec.from_json(ref_row["arch"]))
        activation_inputs = dataset_for(zoo).train.x[:cfg.activation_samples].numpy()
    rows = manifest[["model_id", "uri", "status", "error"]].fillna("").astype(str)
    # bounds the retries of a row whose worker keeps dying; on the driver's node, so a node death leaves it
    ledger = AttemptLedger.options(scheduling_strategy=on_driver_node()).remote()
    ds = row_blocks(rows, cfg.batch_size).map_batches(
        Canonicalizer,
        fn_constructor_kwargs=dict(ref_uri=ref_row["uri"], arch_json=ref_row["arch"], out_dir=out_dir,
                                   cfg_json=cfg.model_dump_json(), activation_inputs=activation_inputs, ledger=ledger),
        batch_size=cfg.batch_size, batch_format="pandas",
        compute=ray.data.ActorPoolStrategy(min_size=cfg.min_actors, max_size=cfg.max_actors),
        num_cpus=cfg.actor_cpus, num_gpus=cfg.actor_gpus or None,
    )
    out = rows_with_progress(ds, len(rows), "canon")
    ray.kill(ledger)
    remove_partial_writes(out_dir)
    missing = sorted(set(manifest["model_id"]) - set(out["model_id"]))
    if missing or len(out) != len(manifest):
        raise RuntimeError(f"canonicalize: {len(manifest)} rows in, {len(out)} rows out (missing: {missing[:5]})")
    merged = manifest.drop(columns=["status", "error"]).merge(
        out[["model_id", *_RESULT_COLUMNS, "status", "error"]], on="model_id", how="left")
    merged["reference_id"] = ref_row["model_id"]
    return merged.sort_values("model_id").reset_index(drop=True)


def load_canonical(cfg: RunConfig, run_store: RunStore) -> tuple[pd.DataFrame, np.ndarray]:
    """The usable canonical models of a run: (their manifest rows, flat weights (n, d))."""
    ok = store.ok_rows(run_store.manifest("canon"))
    return ok, load_flat_models(ok["canon_uri"], ArchSpec.parse(cfg.zoo.arch))
