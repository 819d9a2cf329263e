"""WeightLayout (ordered parameters <-> one flat vector) and safetensors checkpoint I/O (the header codec is
``safetensors_header``)."""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.numpy import save as st_save
from safetensors.torch import load as st_load

from dwf_ray import store
from dwf_ray.archs import ArchSpec, build_model
from dwf_ray.safetensors_header import CheckpointError, decode_header, header_span


def row_error(uri: str, exc: Exception) -> str:
    """A failed row's error: a CheckpointError already names the file; anything else gets the file and its type."""
    return str(exc) if isinstance(exc, CheckpointError) else f"{uri}: {type(exc).__name__}: {exc}"


def error_row(row: dict, error: str, **blanks) -> dict:
    """The manifest row of a model that failed: ``row`` with ``blanks`` (the values it has none of), status
    "error" and the reason ``error``."""
    return row | blanks | {"status": "error", "error": error}


@dataclass(frozen=True)
class Entry:
    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


class WeightLayout:
    """The ordered (name, shape, offset) list of a model's parameters. Buffers are not part of it."""

    def __init__(self, entries: list[Entry]):
        self.entries = entries
        self.size = entries[-1].offset + entries[-1].numel if entries else 0
        self.by_name = {e.name: e for e in entries}

    @classmethod
    def from_module(cls, module: torch.nn.Module) -> "WeightLayout":
        entries, off = [], 0
        for name, p in module.named_parameters():
            entries.append(Entry(name, tuple(p.shape), off))
            off += p.numel()
        return cls(entries)

    @classmethod
    def from_arch(cls, arch: ArchSpec | dict | str) -> "WeightLayout":
        return cls.from_module(build_model(arch))

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def flatten(self, state: dict) -> np.ndarray:
        out = np.empty(self.size, dtype=np.float32)
        for e in self.entries:
            if e.name not in state:
                raise KeyError(f"parameter {e.name!r} missing")
            w = np.asarray(state[e.name], dtype=np.float32)
            if tuple(w.shape) != e.shape:
                raise ValueError(f"parameter {e.name!r} has shape {tuple(w.shape)}, expected {e.shape}")
            out[e.offset:e.offset + e.numel] = w.reshape(-1)
        return out

    def unflatten(self, vec: np.ndarray) -> dict[str, np.ndarray]:
        vec = np.asarray(vec)
        if vec.shape != (self.size,):
            raise ValueError(f"flat vector has shape {vec.shape}, expected ({self.size},)")
        return {e.name: vec[e.offset:e.offset + e.numel].reshape(e.shape) for e in self.entries}


def _metadata(arch: ArchSpec, extra: dict | None) -> dict[str, str]:
    meta = {"arch": arch.to_json()}
    for k, v in (extra or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    return meta


def checkpoint_bytes(tensors: dict[str, np.ndarray], arch: ArchSpec, extra: dict | None = None) -> bytes:
    arrays = {k: np.ascontiguousarray(np.asarray(v, dtype=np.float32)) for k, v in tensors.items()}
    return st_save(arrays, metadata=_metadata(ArchSpec.parse(arch), extra))


def save_checkpoint(uri: str, tensors: dict[str, np.ndarray], arch: ArchSpec, extra: dict | None = None) -> str:
    """Write a safetensors checkpoint (ArchSpec in the header metadata); returns its sha256."""
    data = checkpoint_bytes(tensors, arch, extra)
    store.write_bytes(uri, data)
    return hashlib.sha256(data).hexdigest()


def read_header(uri: str) -> tuple[dict, int]:
    """(header, start of the data buffer) with ranged reads only."""
    n, data_start = header_span(store.read_range(uri, 0, 8), uri)
    raw = store.read_range(uri, 8, data_start)
    if len(raw) != n:
        raise CheckpointError(f"{uri}: truncated checkpoint (header cut short)")
    return decode_header(raw, uri), data_start


SHARD_INDEX = ".index.json"   # a sharded checkpoint: model.safetensors.index.json, pytorch_model.bin.index.json


def load_checkpoint(uri: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata) of a safetensors checkpoint, of a PyTorch state_dict file (.pt/.pth/.bin), or of a
    sharded checkpoint given by its index (``*.index.json``, as transformers' ``save_pretrained`` writes it).

    bfloat16 tensors come back as float32 (numpy has no bfloat16); other dtypes as stored.
    """
    try:
        raw = store.read_bytes(uri)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{uri}: checkpoint not found") from exc
    if uri.endswith(SHARD_INDEX):
        return _load_sharded(raw, uri)
    if uri.endswith((".pt", ".pth", ".bin")):
        return _load_torch(raw, uri), {}
    n, data_start = header_span(raw, uri)
    if len(raw) < data_start:
        raise CheckpointError(f"{uri}: truncated checkpoint ({len(raw)} bytes, header alone needs {data_start})")
    header = decode_header(raw[8:data_start], uri)
    try:
        size = data_start + max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
                                default=0)
    except (KeyError, TypeError, IndexError, ValueError) as exc:
        raise CheckpointError(f"{uri}: corrupt safetensors header (a tensor entry without data_offsets)") from exc
    if len(raw) < size:
        raise CheckpointError(f"{uri}: truncated checkpoint ({len(raw)} of {size} bytes)")
    try:
        tensors = {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in st_load(raw).items()}
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{uri}: unreadable safetensors checkpoint ({exc})") from exc
    return tensors, header.get("__metadata__", {}) or {}


def _load_sharded(raw: bytes, uri: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Every shard an index names (files beside the index), each read by ``load_checkpoint``."""
    try:
        weight_map = json.loads(raw)["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{uri}: not a shard index with a weight_map ({type(exc).__name__}: {exc})") from exc
    folder = uri.rsplit("/", 1)[0] if "/" in uri else "."
    tensors, meta = {}, {}
    for shard in shards:
        part, part_meta = load_checkpoint(store.join(folder, shard))
        tensors.update(part)
        meta.update(part_meta)
    missing = [k for k in weight_map if k not in tensors]
    if missing:
        raise CheckpointError(f"{uri}: the index names tensors that no shard holds: {missing[:5]}")
    return tensors, meta


def torch_load_data(raw: bytes, uri: str):
    """``torch.load(weights_only=True)`` of a file's bytes: tensors, containers and numbers only, nothing in the
    file runs. A refusal or a bad file is one CheckpointError line naming the file (and the global it asked for)."""
    import io
    try:
        return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many error types for bad files; its messages span several lines
        asked = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if asked:
            raise CheckpointError(f"{uri}: refused: the file asks for the Python global {asked[1]}, which a "
                                  f"checkpoint of tensors never needs (read with torch.load(weights_only=True); "
                                  f"nothing in it was run)") from exc
        reason = (str(exc).split("WeightsUnpickler error:", 1)[-1].strip().splitlines() or [""])[0]
        raise CheckpointError(f"{uri}: unreadable PyTorch checkpoint ({type(exc).__name__}: {reason})") from exc


def _load_torch(raw: bytes, uri: str) -> dict[str, np.ndarray]:
    obj = torch_load_data(raw, uri)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{uri}: expected a state_dict, found {type(obj).__name__}")
    return {k: v.detach().float().numpy() for k, v in obj.items() if torch.is_tensor(v) and v.is_floating_point()}


def validate_state(state: dict[str, np.ndarray], arch: ArchSpec, uri: str) -> dict[str, np.ndarray]:
    """Check names, shapes and finiteness against the ArchSpec; returns the state in float32."""
    model = build_model(arch)
    expected = {k: tuple(v.shape) for k, v in model.named_parameters()}
    expected.update({k: tuple(v.shape) for k, v in model.named_buffers()
                     if v.is_floating_point() and k in state})  # buffers are optional: recalibrated
    missing = [k for k in expected if k not in state]
    if missing:
        raise CheckpointError(f"{uri}: missing tensors for {arch.family}: {missing[:5]}")
    for k, shape in expected.items():
        if tuple(state[k].shape) != shape:
            raise CheckpointError(f"{uri}: tensor {k!r} has shape {tuple(state[k].shape)}, "
                                  f"but the ArchSpec expects {shape}")
    out = {k: np.asarray(state[k], dtype=np.float32) for k in expected}
    bad = [k for k, v in out.items() if not np.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{uri}: non-finite (NaN or Inf) values in {bad[:5]}")
    return out


def load_model_state(uri: str, arch: ArchSpec | None = None) -> tuple[dict[str, np.ndarray], ArchSpec]:
    """Load and validate a checkpoint; the ArchSpec comes from its metadata unless given."""
    tensors, meta = load_checkpoint(uri)
    if arch is None:
        if "arch" not in meta:
            raise CheckpointError(f"{uri}: no ArchSpec in the checkpoint metadata; pass one explicitly")
        try:
            arch = ArchSpec.from_json(meta["arch"])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{uri}: the ArchSpec in its metadata is not an object with a family and "
                                  f"args ({type(exc).__name__}: {exc})") from exc
    return validate_state(tensors, ArchSpec.parse(arch), uri), ArchSpec.parse(arch)


def state_to_torch(state: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in state.items()}


def to_module(arch: ArchSpec, state: dict[str, np.ndarray]) -> torch.nn.Module:
    """Build the model and load parameters (buffers keep their defaults when absent)."""
    model = build_model(arch)
    model.load_state_dict(state_to_torch(state), strict=False)
    return model.eval()


def load_flat_models(uris, arch: ArchSpec) -> np.ndarray:
    """(n, d) float32 flat weights of checkpoints, validated against ``arch``, in the order given."""
    layout = WeightLayout.from_arch(arch)
    uris = list(uris)
    out = np.empty((len(uris), layout.size), dtype=np.float32)
    for row, uri in zip(out, uris):
        row[:] = layout.flatten(load_model_state(uri, arch)[0])
    return out
