"""The public Model Zoos (Schürholt, Taskiran, Knyazev, Giró-i-Nieto, Borth; NeurIPS 2022 Datasets and
Benchmarks) as their authors publish them: one Ray Tune experiment folder per zoo.

Layout read here (and written back by ``dwf export --format modelzoo``):

- ``<zoo>/dataset.pt`` (the zoo's data: dataset ``zoo``, see dwf_ray/data/modelzoo.py), ``config.json`` and
  Ray's own files;
- one folder per model, named by Ray Tune (the name may be cut short: only ``params.json`` is read for what the
  model is) holding ``params.json`` (flat keys: ``seed``, ``model::type``, ``model::channels_in``,
  ``model::nlin``, ``model::dropout``, ``optim::lr``, ...), ``result.json`` (JSON lines, one per
  ``training_iteration``, accuracies as fractions; epoch 0's train metrics are -999) and
  ``checkpoint_<epoch:06d>/checkpoints`` (older Ray: ``checkpoint_<epoch>/``), a ``torch.save`` of the plain
  ``state_dict``.

``model::type`` CNN is family ``mz-cnn``, CNN3 ``mz-cnn3``, Resnet18 ``resnet18`` (3x3 stride-1 stem, no max-pool).
A model the authors' loader would drop (a failed trial, no checkpoint at the epoch, NaN, weights above the
threshold) becomes an error row naming its folder and the reason.
"""
from __future__ import annotations

import json
import math
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from dwf_ray import store
from dwf_ray.archs import ArchSpec
from dwf_ray.weights import CheckpointError, save_checkpoint, torch_load_data, validate_state
from dwf_ray.zoo.formats import FormatError, Found, _relative, common_arch

PARAMS, RESULT, CHECKPOINT_FILE, TRIAL_ERROR = "params.json", "result.json", "checkpoints", "error.txt"
_CHECKPOINT_DIR = re.compile(r"checkpoint_(\d+)")
MISSING_METRIC = -999       # what the zoos write for epoch 0's train metrics (nothing trained yet)
TYPES = {"CNN": "mz-cnn", "CNN3": "mz-cnn3", "Resnet18": "resnet18"}


@dataclass
class ModelFolder:
    """One model folder of a zoo: its files and its checkpoint file per epoch."""
    name: str
    uri: str
    files: set[str] = field(default_factory=set)
    checkpoints: dict[int, str] = field(default_factory=dict)


def read_bytes(uri: str) -> bytes:
    """``store.read_bytes`` for files inside model folders. Ray Tune names the folders after config keys such as
    ``model::dropout``, and fsspec reads "::" in a URL as a chain of filesystems: the path is never parsed as one."""
    if store.is_local(uri):
        with open(uri.removeprefix("file://"), "rb") as f:
            return f.read()
    fs, _ = store._fs(uri.split("::", 1)[0])   # the bucket's filesystem, with the store's S3 options
    try:
        return fs.cat_file(uri)
    except Exception as exc:
        explained = store.explain(uri, exc)
        if explained is exc:
            raise
        raise explained from exc


def model_folders(source: str) -> list[ModelFolder]:
    """Every folder directly under ``source`` that holds a ``params.json``, in name order."""
    folders: dict[str, ModelFolder] = {}
    for uri in store.list_files(source):
        parts = _relative(uri, source).split("/")
        if len(parts) < 2:
            continue
        folder = folders.setdefault(parts[0], ModelFolder(parts[0], uri[:len(uri) - len("/".join(parts[1:])) - 1]))
        if len(parts) == 2:
            folder.files.add(parts[1])
        elif len(parts) == 3 and parts[2] == CHECKPOINT_FILE and _CHECKPOINT_DIR.fullmatch(parts[1]):
            folder.checkpoints[int(parts[1].split("_")[1])] = uri
    return [f for _, f in sorted(folders.items()) if PARAMS in f.files]


def is_model_zoo(source: str) -> bool:
    """Whether ``source`` is laid out as a Model Zoo (model folders with params.json and result.json)."""
    try:
        return any(RESULT in f.files for f in model_folders(source))
    except FileNotFoundError:
        return False


def arch_from_params(params: dict) -> ArchSpec:
    """The ArchSpec of a model from its params.json (a ValueError naming the key when it cannot say)."""
    kind = params.get("model::type")
    if kind not in TYPES:
        raise ValueError(f"model::type {kind!r} is not supported (supported: {', '.join(TYPES)})")
    channels = params.get("model::channels_in", 3 if kind != "CNN" else None)
    if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
        raise ValueError(f"model::channels_in {channels!r} is not a positive integer")
    if kind == "Resnet18":
        return ArchSpec("resnet18", {"num_classes": int(params.get("model::o_dim", 10)), "in_channels": channels,
                                     "cifar_stem": True})
    return ArchSpec(TYPES[kind], {"in_channels": channels, "activation": params.get("model::nlin", "leakyrelu")})


def _read_params(folder: ModelFolder) -> tuple[dict | None, Found]:
    uri = store.join(folder.uri, PARAMS)
    try:
        params = json.loads(read_bytes(uri))
        if not isinstance(params, dict):
            raise ValueError(f"a JSON {type(params).__name__}, not an object")
        return params, Found(uri, folder.name, arch_from_params(params))
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        return None, Found(uri, folder.name, error=f"{uri}: {exc}")


def read_all_params(folders: list[ModelFolder], threads: int = 16) -> list[tuple[dict | None, Found]]:
    """(params, what they say) of every model folder; many small reads at once (they are latency-bound on S3)."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(_read_params, folders))


def scan_zoo(source: str, epoch: int | None) -> tuple[ArchSpec, int, pd.DataFrame]:
    """(the one ArchSpec, the epoch, one row per model folder) of the zoo at ``source``. Mixed architectures
    are refused (FormatError, one line naming the odd ones out); ``epoch`` None: the zoo's last checkpoint."""
    folders = model_folders(source)
    if not folders:
        raise FileNotFoundError(f"{source}: no model folders with {PARAMS} (not a Model Zoo folder)")
    read = read_all_params(folders)
    arch = common_arch([found for _, found in read], source)   # mixed: refused, naming the odd ones out
    last = max((e for f in folders for e in f.checkpoints), default=None)
    if epoch is None:
        if last is None:
            raise FormatError(f"{source}: no model folder holds a checkpoint_<epoch>/{CHECKPOINT_FILE}")
        epoch = last
    rows = []
    for folder, (params, found) in zip(folders, read):
        error = found.error or _folder_problem(folder, epoch)
        scalars = {k: v for k, v in (params or {}).items() if isinstance(v, (str, int, float, bool)) or v is None}
        seed = scalars.get("seed")
        rows.append({"name": folder.name, "folder": folder.uri, "source_uri": folder.checkpoints.get(epoch, ""),
                     "scan_error": error, "hparams": json.dumps(scalars, sort_keys=True),
                     "seed": seed if isinstance(seed, int) and not isinstance(seed, bool) else -1})
    return arch, epoch, pd.DataFrame(rows)


def _folder_problem(folder: ModelFolder, epoch: int) -> str:
    """Why a model folder cannot be imported before its files are read ("" when nothing is wrong yet)."""
    if TRIAL_ERROR in folder.files:
        return f"{folder.uri}: the trial failed (Ray Tune wrote {TRIAL_ERROR})"
    if epoch not in folder.checkpoints:
        have = f"epochs {min(folder.checkpoints)}..{max(folder.checkpoints)}" if folder.checkpoints else "none"
        return (f"{folder.uri}: no checkpoint for epoch {epoch} (checkpoint_{epoch:06d}/{CHECKPOINT_FILE} or "
                f"checkpoint_{epoch}/{CHECKPOINT_FILE}; it has {have})")
    return ""


def epoch_result(folder: str, epoch: int) -> dict:
    """The result.json row of ``training_iteration == epoch`` (a CheckpointError naming the folder when absent)."""
    uri = store.join(folder, RESULT)
    try:
        lines = read_bytes(uri).decode().splitlines()
    except (FileNotFoundError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{folder}: {RESULT} unreadable ({type(exc).__name__})") from exc
    for i, line in enumerate(lines):
        try:
            row = json.loads(line) if line.strip() else {}
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break       # a last line cut short: the trial was stopped while writing it
            raise CheckpointError(f"{uri}: line {i + 1} is not JSON") from None
        if isinstance(row, dict) and row.get("training_iteration") == epoch:
            return row
    raise CheckpointError(f"{folder}: {RESULT} has no complete row for training_iteration {epoch} "
                          f"(cut short, or the trial stopped earlier)")


def _metric(row: dict, key: str) -> float:
    """A result.json accuracy, NaN where the zoo has none (epoch 0's -999, or no such key)."""
    value = row.get(key)
    if not isinstance(value, (int, float)) or value == MISSING_METRIC or not math.isfinite(value):
        return math.nan
    return float(value)


def read_zoo_state(uri: str, arch: ArchSpec, max_abs_weight: float | None) -> dict[str, np.ndarray]:
    """A zoo checkpoint (a plain state_dict) as the tensors of ``arch``, validated: the mz-cnn families' layers are
    read from the module_list keys present; NaN/Inf and weights above ``max_abs_weight`` are CheckpointErrors."""
    from dwf_ray.archs.mzcnn import from_module_list
    obj = torch_load_data(read_bytes(uri), uri)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{uri}: expected a state_dict, found {type(obj).__name__}")
    state = {k: v.detach().float().numpy() for k, v in obj.items()
             if hasattr(v, "is_floating_point") and v.is_floating_point()}
    if arch.family in ("mz-cnn", "mz-cnn3"):
        try:
            state = from_module_list(state, arch, uri)
        except ValueError as exc:
            raise CheckpointError(str(exc)) from exc
    state = validate_state(state, arch, uri)
    if max_abs_weight is not None:
        top = max(float(np.abs(v).max()) for v in state.values())
        if top > max_abs_weight:
            raise CheckpointError(f"{uri}: weights above the threshold (max |w| = {top:.4g} > {max_abs_weight:g})")
    return state


def _import_zoo_batch(batch: pd.DataFrame, arch_json: str, epoch: int, max_abs_weight: float | None) -> pd.DataFrame:
    """Each model folder's checkpoint at ``epoch`` written as our safetensors zoo member, with its metrics."""
    import torch
    torch.set_num_threads(1)
    from dwf_ray.zoo import import_rows
    arch = ArchSpec.from_json(arch_json)

    def write(row: dict) -> dict:
        result = epoch_result(row["folder"], epoch)
        state = read_zoo_state(row["source_uri"], arch, max_abs_weight)
        sha256 = save_checkpoint(row["uri"], state, arch, extra={"source": row["source_uri"], "epoch": int(epoch),
                                                                  "seed": int(row["seed"])})
        return dict(n_params=int(sum(v.size for v in state.values())), sha256=sha256, status="ok", error="",
                    **{f"{k}_acc": _metric(result, f"{k}_acc") for k in ("train", "val", "test")})
    return import_rows(batch, write, "folder", train_acc=math.nan, val_acc=math.nan, test_acc=math.nan)


def import_model_zoo(source: str, arch: ArchSpec, dataset: str, out_dir: str, epoch: int | None = None,
                     max_abs_weight: float | None = None, batch_size: int = 32) -> pd.DataFrame:
    """Import every model folder of the zoo at ``source`` in Ray Data tasks; one manifest row per folder (the
    model's seed, its hyper-parameters as JSON, its metrics at ``epoch``), error rows with their reason."""
    from dwf_ray.runtime.data import row_blocks
    from dwf_ray.zoo import MANIFEST_COLUMNS
    found_arch, epoch, todo = scan_zoo(source, epoch)
    if found_arch != arch:
        raise FormatError(f"{source}: the zoo's models are {found_arch.to_json()}, the run's arch is {arch.to_json()}")
    todo["model_id"] = [f"m{i:05d}" for i in range(len(todo))]
    todo["uri"] = [store.join(out_dir, f"{m}.safetensors") for m in todo["model_id"]]
    done = row_blocks(todo, batch_size).map_batches(
        _import_zoo_batch, fn_kwargs={"arch_json": arch.to_json(), "epoch": epoch, "max_abs_weight": max_abs_weight},
        batch_size=batch_size, batch_format="pandas").to_pandas()
    if len(done) != len(todo):
        raise RuntimeError(f"import: {len(todo)} model folders in, {len(done)} rows out")
    manifest = done.reindex(columns=MANIFEST_COLUMNS + ["source_uri", "folder", "epoch", "hparams"])
    manifest["arch"], manifest["dataset"], manifest["epoch"] = arch.to_json(), dataset, epoch
    return manifest.sort_values("model_id").reset_index(drop=True)
