"""What travels over HTTP: the body of ``POST /v1/sample`` and its answer, n models as ONE safetensors file.

Tensors are named ``"<i>.<param name>"`` (model i, parameters in WeightLayout order); the header's metadata
holds the ArchSpec and the request's seed, temperature, solver, steps, label and guidance. Model i's
parameters are contiguous in WeightLayout order, so the data buffer is the (n, d) float32 matrix itself and
streams in chunks straight from it. The client side needs no Ray.
"""
from __future__ import annotations

import json
import math
from typing import Iterator, Literal, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from dwf_ray.config import SOLVERS
from dwf_ray.safetensors_header import MAX_HEADER_BYTES, encode_header as encode_safetensors_header, read_metadata

MAX_SEED = 2 ** 63 - 1
CHUNK_BYTES = 1 << 20
TOKEN_ENV = "DWF_SERVE_TOKEN"       # the service's bearer token, where the service and the client look for it


class SampleRequest(BaseModel):
    """Body of ``POST /v1/sample``. Fields left out take the run's sampling defaults (``GET /v1/info``)."""
    model_config = ConfigDict(extra="forbid")

    n: StrictInt = Field(..., ge=1, description="models to generate")
    seed: Optional[StrictInt] = Field(None, ge=0, le=MAX_SEED, description="source-noise seed; random when absent")
    temperature: Optional[float] = Field(None, gt=0, allow_inf_nan=False, description="source-noise scale")
    solver: Optional[Literal[SOLVERS]] = None
    steps: Optional[StrictInt] = Field(None, ge=1, description="fixed-step solvers only")
    label: Optional[StrictInt] = Field(None, ge=0, description="class of a conditional flow")
    guidance: Optional[float] = Field(None, allow_inf_nan=False, description="classifier-free guidance scale w")
    format: Literal["safetensors", "uri"] = "safetensors"


def header_bytes_per_model(entries: list[tuple[str, tuple[int, ...]]], n_max: int, d: int) -> int:
    """An upper bound of one model's share of the safetensors header (largest index and offsets)."""
    idx, off = len(str(n_max)), len(str(4 * n_max * d))
    return sum(len(json.dumps(name)) + idx + 1 + len(json.dumps(list(shape))) + 2 * off + 48
               for name, shape in entries)


def max_models(entries: list[tuple[str, tuple[int, ...]]], d: int, max_bytes: int) -> int:
    """The largest n whose response stays within ``max_bytes`` and whose header safetensors still reads."""
    n = max(1, max_bytes // (4 * d))
    for _ in range(3):   # the header's share grows with the digits of n: settle it
        per_header = header_bytes_per_model(entries, n, d)
        n = max(1, min((max_bytes - 4096) // (4 * d + per_header), (MAX_HEADER_BYTES - 4096) // per_header))
    return int(n)


def encode_header(entries: list[tuple[str, tuple[int, ...], int]], n: int, d: int, metadata: dict[str, str]) -> bytes:
    """The 8-byte length and JSON header (space-padded to 8 bytes) of n models of ``entries`` (name, shape,
    offset in the flat vector)."""
    header: dict = {"__metadata__": metadata}
    for i in range(n):
        base = 4 * i * d
        for name, shape, offset in entries:
            start = base + 4 * offset
            header[f"{i}.{name}"] = {"dtype": "F32", "shape": list(shape),
                                     "data_offsets": [start, start + 4 * math.prod(shape)]}
    return encode_safetensors_header(header, compact=True)


def stream_safetensors(header: bytes, flat: np.ndarray, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """The header, then the (n, d) float32 buffer in chunks of about ``chunk_bytes``."""
    yield header
    buf = memoryview(np.ascontiguousarray(flat, dtype="<f4")).cast("B")
    for start in range(0, len(buf), chunk_bytes):
        yield bytes(buf[start:start + chunk_bytes])


def split_models(data: bytes) -> tuple[list[dict[str, np.ndarray]], dict[str, str]]:
    """(one state dict per model, in index order; the file's metadata) of a ``/v1/sample`` answer."""
    from safetensors.numpy import load
    tensors = load(data)
    n = int(read_metadata(data).get("n", 0)) or 1 + max((int(k.split(".", 1)[0]) for k in tensors), default=-1)
    models: list[dict[str, np.ndarray]] = [{} for _ in range(n)]
    for key, value in tensors.items():
        i, name = key.split(".", 1)
        models[int(i)][name] = value
    return models, read_metadata(data)


def format_server_timing(parts: list[tuple[str, float]]) -> str:
    """An HTTP ``Server-Timing`` value of (name, seconds) parts, in milliseconds."""
    return ", ".join(f"{name};dur={1000 * max(0.0, seconds):.3f}" for name, seconds in parts)


def parse_server_timing(header: str) -> dict[str, float]:
    """A ``Server-Timing`` value as {name: seconds}."""
    out = {}
    for part in header.split(","):
        name, _, dur = part.strip().partition(";dur=")
        if dur:
            out[name] = float(dur) / 1000
    return out
