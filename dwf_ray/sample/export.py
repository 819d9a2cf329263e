"""A run's generated models (samples/) written in the form their own library loads directly.

- ``safetensors``: our checkpoints as they are (ArchSpec in the metadata), ``<model_id>.safetensors``;
- ``modelzoo`` (families ``mz-cnn``, ``mz-cnn3``, ``resnet18`` with the zoos' CIFAR stem): the public Model Zoos'
  own layout, one folder per model with ``params.json`` (the zoo's hyper-parameters of its first usable model,
  with this model's type and a seed), ``result.json`` (one row: the epoch imported, ``test_acc`` on the run's
  test split) and ``checkpoint_<epoch:06d>/checkpoints``, a ``torch.save`` of the plain ``state_dict``, what the
  authors' ``NNmodule(params).model.load_state_dict`` and their dataset loaders read;
- ``hf`` (family ``bert``): one folder per model with ``config.json`` and ``model.safetensors``, what
  ``transformers.BertForSequenceClassification.from_pretrained(folder)`` loads;
- ``torchvision`` (families ``resnet18``, ``resnet20``, ``vit``): one ``state_dict`` file per model,
  ``<model_id>.pt``, that the torchvision model loads with ``load_state_dict(torch.load(f), strict=True)``.
  Generated checkpoints hold parameters only; BatchNorm running statistics are recalibrated on the run's
  training split (as evaluation does), or left at their defaults (mean 0, variance 1) with
  ``recalibrate=False``.

``manifest.parquet`` beside the exported models lists them: model id, source checkpoint, exported path,
format, ArchSpec, how to load it, and what the BatchNorm statistics are.
"""
from __future__ import annotations

import io
import json
import os
import tempfile

import pandas as pd
import torch

from dwf_ray import store
from dwf_ray.accuracy import recalibrate_batchnorm
from dwf_ray.archs import ArchSpec
from dwf_ray.config import RunConfig
from dwf_ray.data import dataset_for
from dwf_ray.runtime import ensure_ray
from dwf_ray.runtime.data import row_blocks
from dwf_ray.store import RunStore, ok_rows
from dwf_ray.weights import load_model_state, to_module

FORMATS = ("hf", "torchvision", "safetensors", "modelzoo")
FAMILIES = {"hf": ("bert",), "torchvision": ("resnet18", "resnet20", "vit"), "safetensors": None,
            "modelzoo": ("mz-cnn", "mz-cnn3", "resnet18")}
ZOO_TYPES = {"mz-cnn": "CNN", "mz-cnn3": "CNN3", "resnet18": "Resnet18"}   # family -> the zoos' model::type
COLUMNS = ["model_id", "source_uri", "uri", "format", "arch", "loads_with", "bn_stats"]


class ExportError(ValueError):
    """A run that cannot be exported in the asked format; the message is one line."""


def loads_with(arch: ArchSpec, fmt: str) -> str:
    """How a user loads one exported model of ``arch`` (a line of Python)."""
    a = arch.args
    if fmt == "safetensors":
        return "dwf_ray.weights.load_model_state(path)"
    if fmt == "hf":
        return "transformers.BertForSequenceClassification.from_pretrained(folder)"
    if fmt == "modelzoo":
        return ("the zoo's own NNmodule(json.load(open(folder/params.json))).model.load_state_dict("
                "torch.load(folder/checkpoint_<epoch:06d>/checkpoints))")
    if arch.family == "resnet18" and a.get("width", 64) == 64:
        base = f"torchvision.models.resnet18(num_classes={a['num_classes']})"
        changes = []
        if a.get("cifar_stem"):
            changes += [f"conv1 = nn.Conv2d({a.get('in_channels', 3)}, 64, 3, 1, 1, bias=False)",
                        "maxpool = nn.Identity()"]
        elif a.get("in_channels", 3) != 3:
            changes.append(f"conv1 = nn.Conv2d({a['in_channels']}, 64, 7, 2, 3, bias=False)")
        return base + (f" with {', '.join(changes)}" if changes else "") + "; .load_state_dict(torch.load(path))"
    if arch.family == "vit":
        keys = ("image_size", "patch_size", "num_layers", "num_heads", "hidden_dim", "mlp_dim", "num_classes",
                "dropout", "attention_dropout")
        base = f"torchvision.models.VisionTransformer({', '.join(f'{k}={a[k]}' for k in keys if k in a)})"
        if a.get("in_channels", 3) != 3:
            p = a["patch_size"]
            base += f" with conv_proj = nn.Conv2d({a['in_channels']}, {a['hidden_dim']}, {p}, {p})"
        return base + "; .load_state_dict(torch.load(path))"
    return ("dwf_ray.archs.build_model(arch).load_state_dict(torch.load(path)) "
            "(torchvision's ResNet names; no torchvision constructor builds this one)")


def _has_batchnorm(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _write_hf(model: torch.nn.Module, folder: str) -> None:
    """``save_pretrained`` into a local temporary folder, then each file to ``folder`` (local or S3)."""
    from dwf_ray.archs.bert import to_transformers
    with tempfile.TemporaryDirectory() as tmp:
        to_transformers(model).save_pretrained(tmp)
        for name in sorted(os.listdir(tmp)):
            with open(os.path.join(tmp, name), "rb") as f:
                store.write_bytes(store.join(folder, name), f.read())


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _batchnorm_stats(model: torch.nn.Module, cfg: RunConfig, recalibrate: bool) -> str:
    """Recalibrate the model's BatchNorm statistics on the training split (unless not asked); what they are."""
    if not _has_batchnorm(model):
        return "none"
    if not recalibrate:
        return "default (mean 0, variance 1)"
    recalibrate_batchnorm(model, dataset_for(cfg.zoo).train, cfg.eval.bn_recal_batches, seed=cfg.eval.seed)
    return f"recalibrated on the {cfg.zoo.dataset} training split"


def _write_modelzoo(model: torch.nn.Module, arch: ArchSpec, folder: str, number: int, zoo: dict,
                    cfg: RunConfig) -> None:
    """One generated model as a Model Zoo model folder: params.json, result.json, checkpoint_<epoch>/checkpoints."""
    from dwf_ray.accuracy import accuracy
    params = dict(zoo["hparams"]) | {"model::type": ZOO_TYPES[arch.family], "seed": number,
                                     "model::channels_in": arch.args.get("in_channels", 3),
                                     "dwf::generated": True}
    if arch.family == "resnet18":
        params["model::o_dim"] = arch.args["num_classes"]
    else:
        params["model::nlin"] = arch.args.get("activation", "leakyrelu")
        if arch.family == "mz-cnn":
            params["model::dropout"] = 0.0   # our module_list has no Dropout entries: the zoo's CNN at dropout 0
    epoch = zoo["epoch"]
    result = {"training_iteration": epoch, "test_acc": accuracy(model, dataset_for(cfg.zoo).test)}
    store.write_bytes(store.join(folder, "params.json"), json.dumps(params, indent=2, sort_keys=True).encode())
    store.write_bytes(store.join(folder, "result.json"), (json.dumps(result) + "\n").encode())
    store.write_bytes(store.join(folder, f"checkpoint_{epoch:06d}", "checkpoints"), _torch_bytes(model.state_dict()))


def _export_batch(batch: pd.DataFrame, fmt: str, out: str, cfg_json: str, recalibrate: bool,
                  zoo_json: str) -> pd.DataFrame:
    torch.set_num_threads(1)
    cfg = RunConfig.model_validate_json(cfg_json)
    rows = []
    for row in batch.to_dict("records"):
        bn = "none"
        if fmt == "safetensors":
            uri = store.join(out, f"{row['model_id']}.safetensors")
            store.write_bytes(uri, store.read_bytes(row["source_uri"]))
        else:
            state, arch = load_model_state(row["source_uri"])
            model = to_module(arch, state)
            if fmt == "hf":
                uri = store.join(out, row["model_id"])
                _write_hf(model, uri)
            elif fmt == "modelzoo":
                bn, uri = _batchnorm_stats(model, cfg, recalibrate), store.join(out, row["model_id"])
                number = int("".join(c for c in row["model_id"] if c.isdigit()) or 0)
                _write_modelzoo(model, arch, uri, number, json.loads(zoo_json), cfg)
            else:
                bn, uri = _batchnorm_stats(model, cfg, recalibrate), store.join(out, f"{row['model_id']}.pt")
                store.write_bytes(uri, _torch_bytes(model.state_dict()))
        rows.append({**row, "uri": uri, "bn_stats": bn})
    return pd.DataFrame(rows)


def _zoo_facts(run_store: RunStore, arch: ArchSpec) -> dict:
    """For the modelzoo format: the epoch the zoo was imported at and the hyper-parameters of its first usable
    model (a run trained here: epoch 0 and none)."""
    if arch.family == "resnet18" and (not arch.args.get("cifar_stem") or arch.args.get("width", 64) != 64):
        raise ExportError("--format modelzoo: the zoos' Resnet18 has the 3x3 stride-1 stem and width 64; this "
                          f"run's is {arch.to_json()}: use --format torchvision")
    manifest = ok_rows(run_store.manifest("zoo"))
    first = manifest.iloc[0] if len(manifest) else {}
    hparams = json.loads(first["hparams"]) if "hparams" in manifest.columns and len(manifest) else {}
    epoch = int(first["epoch"]) if "epoch" in manifest.columns and len(manifest) else 0
    return {"epoch": epoch, "hparams": {k: v for k, v in hparams.items() if not k.startswith("dwf::")}}


def export_samples(root: str, fmt: str, out: str, recalibrate: bool = True, batch_size: int = 8) -> pd.DataFrame:
    """Export the generated models of the run at ``root`` to ``out`` (a folder or s3:// prefix) as ``fmt``;
    returns the manifest also written to ``out/manifest.parquet``. Ray Data tasks write the models."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; formats: {', '.join(FORMATS)}")
    run_store = RunStore(root)
    cfg = run_store.saved_config(RunConfig)
    if cfg is None:
        raise ExportError(f"{run_store.root}: no config.json; not a dwf run root")
    arch = ArchSpec.parse(cfg.zoo.arch)
    families = FAMILIES[fmt]
    if families is not None and arch.family not in families:
        raise ExportError(f"--format {fmt} is for the families {', '.join(families)}; this run's models are "
                          f"{arch.family}: use --format safetensors")
    if not run_store.done(store.STAGE_FOLDERS["sample"]):
        raise ExportError(f"{run_store.root}: no generated models yet (the sample stage is not complete): "
                          f"run dwf sample --root {run_store.root}")
    manifest = ok_rows(run_store.manifest("sample"))
    if manifest.empty:
        raise ExportError(f"{run_store.root}: the sample stage wrote no usable models (see samples/manifest.parquet)")
    todo = pd.DataFrame({"model_id": manifest["model_id"].tolist(), "source_uri": manifest["uri"].tolist()})
    zoo = _zoo_facts(run_store, arch) if fmt == "modelzoo" else {}
    ensure_ray()
    ds = row_blocks(todo, batch_size)
    done = ds.map_batches(_export_batch, fn_kwargs={"fmt": fmt, "out": out, "cfg_json": cfg.model_dump_json(),
                                                    "recalibrate": recalibrate, "zoo_json": json.dumps(zoo)},
                          batch_size=batch_size, batch_format="pandas").to_pandas()
    if len(done) != len(todo):
        raise RuntimeError(f"export: {len(todo)} models in, {len(done)} out")
    done["format"], done["arch"], done["loads_with"] = fmt, arch.to_json(), loads_with(arch, fmt)
    done = done.reindex(columns=COLUMNS).sort_values("model_id").reset_index(drop=True)
    if fmt == "modelzoo" and cfg.zoo.dataset == "zoo":   # a whole zoo folder, its data beside the models
        from dwf_ray.data.modelzoo import DATASET_FILE
        store.write_bytes(store.join(out, DATASET_FILE), store.read_bytes(store.join(cfg.zoo.data_root, DATASET_FILE)))
    store.write_table(store.join(out, "manifest.parquet"), done)
    return done
