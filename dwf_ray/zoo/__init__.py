"""Training a zoo of models with different seeds as Ray tasks, or importing checkpoints (the zoo stage is
``zoo/stage.py``)."""
from __future__ import annotations

import copy
import hashlib
import json
from typing import Callable

import pandas as pd
import ray
import torch
import torch.nn.functional as F

from dwf_ray import store
from dwf_ray.accuracy import accuracy
from dwf_ray.archs import ArchSpec, build_model
from dwf_ray.config import ZooConfig
from dwf_ray.data import dataset_for
from dwf_ray.runtime import cluster_cpus
from dwf_ray.runtime.data import row_blocks
from dwf_ray.runtime.progress import wait_with_progress
from dwf_ray.weights import (CheckpointError, error_row, load_checkpoint, load_model_state, row_error,
                             save_checkpoint)
from dwf_ray.zoo.formats import scan
from dwf_ray.zoo.lockstep import chunk_metrics, lockstep_problem, lr_schedule, train_lockstep

LOCKSTEP_CHUNK = 256    # default models per task for lockstep families (bench/zoo_throughput.py measures it)

_NO_MEMBER = {"n_params": 0, "sha256": ""}    # what an error row has instead of a written checkpoint
MANIFEST_COLUMNS = ["model_id", "uri", "arch", "dataset", "seed", "n_params", "sha256",
                    "train_acc", "val_acc", "test_acc", "status", "error"]


def train_classifier(model: torch.nn.Module, cfg: ZooConfig, seed: int) -> torch.nn.Module:
    """AdamW with a cosine or constant learning rate (``zoo.lr_schedule``); keeps the epoch with the best validation accuracy (never looks at test)."""
    data = dataset_for(cfg)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = lr_schedule(opt, cfg, len(data.train))
    best, best_acc = copy.deepcopy(model.state_dict()), -1.0
    for _ in range(cfg.epochs):
        model.train()
        order = torch.randperm(len(data.train), generator=g)
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            loss = F.cross_entropy(model(data.train.x[idx]), data.train.y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        val = accuracy(model, data.val)
        if val > best_acc:
            best, best_acc = copy.deepcopy(model.state_dict()), val
    model.load_state_dict(best)
    return model.eval()


def _metrics(model: torch.nn.Module, cfg: ZooConfig) -> dict:
    data = dataset_for(cfg)
    return {f"{k}_acc": accuracy(model, getattr(data, k)) for k in ("train", "val", "test")}


def _row(model_id: str, uri: str, arch: ArchSpec, cfg: ZooConfig, seed: int, **kw) -> dict:
    row = dict.fromkeys(MANIFEST_COLUMNS)
    row.update(model_id=model_id, uri=uri, arch=arch.to_json(), dataset=cfg.dataset, seed=seed,
               status="ok", error="")
    row.update(kw)
    return row


def _reused_row(model_id: str, uri: str, arch: ArchSpec, cfg: ZooConfig, seed: int) -> dict | None:
    """The row of a checkpoint a previous attempt already wrote, or None (absent or unreadable: train again)."""
    if not store.exists(uri):
        return None
    try:
        _, meta = load_checkpoint(uri)
        sha256 = hashlib.sha256(store.read_bytes(uri)).hexdigest()
        return _row(model_id, uri, arch, cfg, seed, **json.loads(meta["row"]), sha256=sha256)
    except (CheckpointError, KeyError):
        return None


def _write_member(model_id: str, uri: str, arch: ArchSpec, cfg: ZooConfig, seed: int, state: dict,
                  metrics: dict) -> dict:
    """One trained model's checkpoint (its row in the header metadata) and its manifest row."""
    info = {"n_params": int(sum(v.size for v in state.values())), **metrics}
    info["sha256"] = save_checkpoint(uri, state, arch, extra={"row": json.dumps(info), "seed": str(seed)})
    return _row(model_id, uri, arch, cfg, seed, **info)


def _train_alone(model_id: str, uri: str, arch: ArchSpec, cfg: ZooConfig, seed: int) -> dict:
    torch.manual_seed(seed)
    model = train_classifier(build_model(arch), cfg, seed)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items() if v.is_floating_point()}
    return _write_member(model_id, uri, arch, cfg, seed, state, _metrics(model, cfg))


def _train_together(members: list[tuple[str, str, int]], arch: ArchSpec, cfg: ZooConfig) -> list[dict]:
    """Train a chunk in lockstep; a model whose loss stopped being finite becomes an error row naming its seed,
    and the rest of its chunk is kept."""
    data = dataset_for(cfg)
    result = train_lockstep(arch, cfg, [seed for _, _, seed in members], data)
    metrics = chunk_metrics(arch, result.states, data)
    rows = []
    for (model_id, uri, seed), state, epoch, acc in zip(members, result.states, result.diverged, metrics):
        if epoch is None:
            rows.append(_write_member(model_id, uri, arch, cfg, seed, state, acc))
        else:
            rows.append(error_row(_row(model_id, uri, arch, cfg, seed),
                                  f"{uri}: seed {seed} diverged (training loss not finite in epoch {epoch}); "
                                  f"its chunk-mates were kept", **_NO_MEMBER))
    return rows


@ray.remote
def train_chunk(cfg_json: str, members: list[tuple[str, str, int]]) -> list[dict]:
    """Train the zoo models ``members`` (model id, checkpoint uri, seed) and write their checkpoints: in lockstep
    when the family allows it, else one after another. Checkpoints already written are reused."""
    torch.set_num_threads(1)
    cfg = ZooConfig.model_validate_json(cfg_json)
    arch = ArchSpec.parse(cfg.arch)
    rows = {m[0]: _reused_row(*m[:2], arch, cfg, m[2]) for m in members}
    todo = [m for m in members if rows[m[0]] is None]
    if len(todo) > 1 and lockstep_problem(arch) is None:
        rows |= {r["model_id"]: r for r in _train_together(todo, arch, cfg)}
    else:
        rows |= {m[0]: _train_alone(m[0], m[1], arch, cfg, m[2]) for m in todo}
    return [rows[m[0]] for m in members]


def models_per_task(cfg: ZooConfig, cpus: int) -> int:
    """``zoo.models_per_task``, or by default: one for families that train alone, else chunks of up to
    ``LOCKSTEP_CHUNK`` models, at least two tasks per CPU so that the cluster stays busy."""
    arch = ArchSpec.parse(cfg.arch)
    if cfg.models_per_task is not None:
        if cfg.models_per_task > 1 and lockstep_problem(arch):
            raise ValueError(f"zoo.models_per_task={cfg.models_per_task}: {lockstep_problem(arch)}")
        return cfg.models_per_task
    if lockstep_problem(arch):
        return 1
    return max(1, min(LOCKSTEP_CHUNK, -(-cfg.n_models // (2 * max(1, cpus)))))


def train_zoo(cfg: ZooConfig, out_dir: str) -> pd.DataFrame:
    """Train ``cfg.n_models`` models in Ray tasks of ``models_per_task`` each; returns the manifest (one row per
    model)."""
    cfg_json, arch = cfg.model_dump_json(), ArchSpec.parse(cfg.arch)
    members = [(f"m{i:05d}", store.join(out_dir, f"m{i:05d}.safetensors"), cfg.seed0 + i) for i in range(cfg.n_models)]
    per_task = models_per_task(cfg, cluster_cpus())
    chunks = [members[i:i + per_task] for i in range(0, len(members), per_task)]
    task = train_chunk.options(num_cpus=cfg.cpus_per_model, max_retries=cfg.max_retries)
    refs = [task.remote(cfg_json, chunk) for chunk in chunks]

    def died(i: int, exc: Exception) -> list[dict]:   # the worker died on every attempt: error rows, the rest go on
        return [error_row(_row(model_id, uri, arch, cfg, seed),
                          f"{uri}: the worker process died each time it trained this model's chunk "
                          f"({1 + cfg.max_retries} attempts; {type(exc).__name__})", **_NO_MEMBER)
                for model_id, uri, seed in chunks[i]]
    parts = wait_with_progress(refs, "zoo: training", sizes=[len(c) for c in chunks], on_died=died)
    return pd.DataFrame([row for part in parts for row in part], columns=MANIFEST_COLUMNS)


def import_rows(batch: pd.DataFrame, write: Callable[[dict], dict], failed_uri: str, **blanks) -> pd.DataFrame:
    """Each row of an import batch with the columns ``write(row)`` gives (it writes the row's model as a zoo
    member); a row whose scan or write failed becomes an error row, its uri the row's ``failed_uri`` column and
    ``blanks`` its values. The import goes on."""
    rows = []
    for row in batch.to_dict("records"):
        try:
            if row["scan_error"]:
                raise CheckpointError(row["scan_error"])
            rows.append(row | write(row))
        except Exception as exc:  # a bad model becomes an error row naming it
            rows.append(error_row(row, row_error(row["source_uri"] or row[failed_uri], exc), uri=row[failed_uri],
                                  **_NO_MEMBER, **blanks))
    return pd.DataFrame(rows)


def _import_batch(batch: pd.DataFrame, arch_json: str) -> pd.DataFrame:
    """Validate each source checkpoint against the ArchSpec and write it as a safetensors zoo member."""
    arch = ArchSpec.from_json(arch_json)

    def write(row: dict) -> dict:
        state, _ = load_model_state(row["source_uri"], arch)
        return dict(n_params=int(sum(v.size for v in state.values())), status="ok", error="",
                    sha256=save_checkpoint(row["uri"], state, arch, extra={"source": row["source_uri"]}))
    return import_rows(batch, write, "source_uri")


def import_checkpoints(source: str, arch: ArchSpec, dataset: str, out_dir: str, batch_size: int = 16) -> pd.DataFrame:
    """Import a folder or S3 prefix of checkpoints as a zoo, in parallel Ray tasks: transformers
    ``save_pretrained`` folders, safetensors and PyTorch state_dict files (see ``zoo.formats``).

    Every model gets a manifest row; models that fail validation keep status "error" and their reason.
    """
    found = scan(source, infer=False)
    ids = [f"m{i:05d}" for i in range(len(found))]
    todo = pd.DataFrame({"model_id": ids, "source_uri": [f.uri for f in found],
                         "scan_error": [f.error for f in found],
                         "uri": [store.join(out_dir, f"{m}.safetensors") for m in ids]})
    ds = row_blocks(todo, batch_size)
    done = ds.map_batches(_import_batch, fn_kwargs={"arch_json": arch.to_json()}, batch_size=batch_size,
                          batch_format="pandas").to_pandas()
    if len(done) != len(todo):
        raise RuntimeError(f"import: {len(todo)} models in, {len(done)} rows out")
    manifest = done.reindex(columns=MANIFEST_COLUMNS + ["source_uri"])
    manifest["arch"], manifest["dataset"], manifest["seed"] = arch.to_json(), dataset, -1
    return manifest.sort_values("model_id").reset_index(drop=True)


def check_arch_fits_data(arch: ArchSpec, zoo_cfg: ZooConfig) -> None:
    """Load the dataset once (a missing file fails here, naming it) and run the model on two training examples:
    a model that does not take the dataset's inputs or classes fails before any zoo task starts."""
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


def check_zoo_config(cfg: ZooConfig) -> None:
    """What can be checked before any work: the dataset's arguments and how the models are grouped into tasks
    (a ValueError naming the key and the problem)."""
    from dwf_ray.data import dataset_args
    dataset_args(cfg.dataset, cfg.dataset_args)
    models_per_task(cfg, 1)
