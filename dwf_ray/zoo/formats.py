"""Checkpoints the way people keep them: which files under an import source make one model, and what
architecture the files themselves say it is.

A source (a folder or s3:// prefix) may hold
- model folders, one model each, as transformers' ``save_pretrained`` writes them: ``config.json`` with
  ``model.safetensors``, or shards with ``model.safetensors.index.json``, or ``pytorch_model.bin`` (or its
  sharded index). Other files there (tokenizer, ``training_args.bin``, optimizer state) are not models;
- flat files, one model each: our safetensors checkpoints (ArchSpec in their metadata), any other
  safetensors file, PyTorch ``state_dict`` files (.pt, .pth, .bin), e.g. torchvision's.

The ArchSpec comes from a model folder's ``config.json`` (a ``model_type`` this package supports) or from our
safetensors metadata; plain state_dicts say nothing, and need ``--arch``. Tensors are read by
``dwf_ray.weights.load_checkpoint`` only.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass

from dwf_ray import store
from dwf_ray.archs import ArchSpec
from dwf_ray.weights import SHARD_INDEX, CheckpointError, read_header

FLAT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
# what save_pretrained writes, in the order transformers' from_pretrained looks for it
HF_WEIGHTS = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
              "pytorch_model.bin")
HF_CONFIG = "config.json"


def _bert(config: dict) -> ArchSpec:
    from dwf_ray.archs.bert import args_from_hf_config
    architectures = config.get("architectures") or ["BertForSequenceClassification"]
    if "BertForSequenceClassification" not in architectures:
        raise ValueError(f"a {'/'.join(architectures)} checkpoint; bert imports as BertForSequenceClassification "
                         f"(a classifier head on the encoder)")
    return ArchSpec("bert", args_from_hf_config(config))


# transformers model_type -> the ArchSpec of its config.json
HF_MODEL_TYPES = {"bert": _bert}


class FormatError(ValueError):
    """An import source that cannot be imported as it is; the message is one line naming the files."""


@dataclass(frozen=True)
class Found:
    """One model under an import source."""
    uri: str                         # what load_checkpoint reads: a file, or a sharded checkpoint's index
    name: str                        # its place under the source, as messages name it
    arch: ArchSpec | None = None     # what the files say it is; None: they do not say (or were not asked)
    error: str = ""                  # why it cannot be imported before its tensors are read


def arch_from_hf_config(config: dict, uri: str) -> ArchSpec:
    """The ArchSpec of a transformers ``config.json``; a model_type this package does not build is refused."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in HF_MODEL_TYPES:
        raise FormatError(f"{uri}: model_type {model_type!r} is not supported; supported: "
                          f"{', '.join(sorted(HF_MODEL_TYPES))}")
    try:
        return HF_MODEL_TYPES[model_type](config)
    except ValueError as exc:
        raise FormatError(f"{uri}: {exc}") from exc


def _model_folder(folder: str, names: set[str], source: str, infer: bool) -> Found:
    weights = next((n for n in HF_WEIGHTS if n in names), None)
    uri = store.join(folder, weights or HF_CONFIG)
    name = _relative(folder, source) or folder.rsplit("/", 1)[-1]
    if weights is None:
        return Found(uri, name, error=f"{folder}: a model folder without weights (expected one of "
                                      f"{', '.join(HF_WEIGHTS)})")
    if not infer or HF_CONFIG not in names:
        return Found(uri, name)
    config_uri = store.join(folder, HF_CONFIG)
    try:
        config = store.read_json(config_uri)
        if not isinstance(config, dict):
            raise ValueError(f"a JSON {type(config).__name__}, not an object")
    except (ValueError, UnicodeDecodeError) as exc:
        return Found(uri, name, error=f"{config_uri}: unreadable config.json ({exc})")
    return Found(uri, name, arch_from_hf_config(config, config_uri))


def _flat_file(uri: str, source: str, infer: bool) -> Found:
    found = Found(uri, _relative(uri, source))
    if not infer or not uri.endswith(".safetensors"):
        return found
    try:
        meta = read_header(uri)[0].get("__metadata__") or {}
        return Found(uri, found.name, ArchSpec.from_json(meta["arch"]) if "arch" in meta else None)
    except (CheckpointError, ValueError, KeyError, TypeError):
        return found   # its row fails with the reason when it is read


def _relative(uri: str, source: str) -> str:
    """``uri`` below ``source``, as listed (local listings are absolute paths)."""
    base = os.path.abspath(source.removeprefix("file://")) if store.is_local(source) else source
    base = base.rstrip("/")
    return uri[len(base) + 1:] if uri.startswith(base + "/") else "" if uri == base else uri


def scan(source: str, infer: bool = True) -> list[Found]:
    """Every model under ``source``, in path order. ``infer``: also read what each says it is (config.json,
    our metadata); an unsupported model_type raises FormatError."""
    files = store.list_files(source)
    if not files:
        raise FileNotFoundError(f"{source}: no files found")
    folders: dict[str, set[str]] = {}
    for uri in files:
        folder, _, name = uri.rpartition("/")
        folders.setdefault(folder, set()).add(name)
    models = {f for f, names in folders.items() if HF_CONFIG in names or any(n.endswith(SHARD_INDEX) for n in names)}
    out = [_model_folder(f, folders[f], source, infer) for f in sorted(models)]
    out += [_flat_file(uri, source, infer) for uri in files
            if uri.rpartition("/")[0] not in models and uri.endswith(FLAT_SUFFIXES)]
    if not out:
        raise FileNotFoundError(f"{source}: no checkpoints found (model folders with {HF_CONFIG}, or "
                                f"{', '.join(FLAT_SUFFIXES)} files)")
    return sorted(out, key=lambda f: f.uri)


def _describe(arch: ArchSpec, like: ArchSpec) -> str:
    """What sets ``arch`` apart from ``like``: its family, or the arguments that differ."""
    if arch.family != like.family:
        return arch.family
    diff = [f"{k}={arch.args.get(k)}" for k in sorted(set(arch.args) | set(like.args))
            if arch.args.get(k) != like.args.get(k)]
    return f"{arch.family} {' '.join(diff)}"


def common_arch(found: list[Found], source: str) -> ArchSpec:
    """The one ArchSpec the models under ``source`` say they are. Refused (FormatError, one line) when none says,
    or when they disagree: then the message names the odd ones out."""
    said = [f for f in found if f.arch is not None]
    if not said:
        raise FormatError(f"{source}: the checkpoints do not say what architecture they are (plain state_dicts, "
                          f"e.g. torchvision's, or safetensors without our metadata): pass --arch")
    counts = Counter(f.arch.to_json() for f in said)
    majority = ArchSpec.from_json(counts.most_common(1)[0][0])
    odd = [f for f in said if f.arch != majority]
    if odd:
        listed = ", ".join(f"{f.name} ({_describe(f.arch, majority)})" for f in odd[:10])
        more = f" and {len(odd) - 10} more" if len(odd) > 10 else ""
        raise FormatError(f"{source}: mixed architectures, one run imports one: {len(said) - len(odd)} models are "
                          f"{majority.family}; the odd ones out: {listed}{more}")
    return majority


def infer_arch(source: str) -> ArchSpec:
    """The ArchSpec of every model under ``source``, from what the files say (for ``dwf zoo import`` without
    ``--arch``)."""
    return common_arch(scan(source), source)

