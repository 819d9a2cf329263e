"""The safetensors header, the one codec of it: an 8-byte little-endian length, then a JSON object of tensor
entries (dtype, shape, data_offsets) and an optional ``__metadata__`` object of strings, space-padded to a
multiple of 8 bytes. Checkpoints (``weights``), PCA shard files (``pca/shardfile``) and HTTP answers use it."""
from __future__ import annotations

import json
import struct

MAX_HEADER_BYTES = 100_000_000     # safetensors readers refuse larger headers


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


def encode_header(header: dict, compact: bool = False) -> bytes:
    """The length prefix and the padded JSON of ``header`` (``compact``: no spaces after separators)."""
    raw = json.dumps(header, separators=(",", ":") if compact else None).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def header_span(raw: bytes, uri: str) -> tuple[int, int]:
    """(header length, start of the data buffer) from the first 8 bytes of a file."""
    if len(raw) < 8:
        raise CheckpointError(f"{uri}: truncated checkpoint ({len(raw)} bytes, no safetensors header)")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > MAX_HEADER_BYTES:
        raise CheckpointError(f"{uri}: not a safetensors file (header length {n})")
    return n, 8 + n


def decode_header(raw: bytes, uri: str) -> dict:
    """The JSON header (the bytes after the length): an object of tensor entries and an optional
    ``__metadata__`` object of strings."""
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{uri}: corrupt safetensors header ({exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{uri}: corrupt safetensors header (a JSON {type(header).__name__}, not an object)")
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{uri}: corrupt safetensors header (__metadata__ must map names to strings)")
    return header


def read_metadata(data: bytes, uri: str = "safetensors data") -> dict[str, str]:
    """The ``__metadata__`` of a whole safetensors file held in memory."""
    _, data_start = header_span(data, uri)
    return decode_header(data[8:data_start], uri).get("__metadata__") or {}
