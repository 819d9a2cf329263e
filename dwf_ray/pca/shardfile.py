"""One persisted PCA shard: a safetensors file with the mean and components of one column range.

The file holds one float32 tensor ``basis`` of shape (columns, 1 + k): column 0 is the mean, columns 1.. the
components, so a shard is written block of rows by block of rows in one pass, and decoding latents z is the
single product [1, z] @ basis^T. Local shards are memory-mapped when loaded.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from dwf_ray import store
from dwf_ray.safetensors_header import encode_header

BASIS = "basis"


@dataclass
class Shard:
    start: int
    stop: int
    basis: np.ndarray           # (stop - start, 1 + k) float32

    @property
    def mean(self) -> np.ndarray:
        return self.basis[:, 0]

    @property
    def components(self) -> np.ndarray:
        return self.basis[:, 1:]


@contextmanager
def write_shard(uri: str, start: int, stop: int, k: int):
    """Yields ``put(rows)``: call it with consecutive (rows, 1 + k) float32 blocks covering [start, stop).

    Blocks are written by a background thread while the caller computes the next one: ``put`` returns once
    the previous block is written, so the caller may refill that one's buffer; the block just passed stays
    in use until the next ``put`` or the end.
    """
    rows_total, left = stop - start, [stop - start]
    header = {BASIS: {"dtype": "F32", "shape": [rows_total, 1 + k], "data_offsets": [0, 4 * rows_total * (1 + k)]},
              "__metadata__": {"start": str(start), "stop": str(stop)}}
    with store.atomic_writer(uri) as f, ThreadPoolExecutor(1) as writer:
        f.write(encode_header(header))
        pending = [writer.submit(lambda: None)]

        def put(rows: np.ndarray) -> None:
            if rows.ndim != 2 or rows.shape[1] != 1 + k or rows.shape[0] > left[0] or rows.dtype != np.float32:
                raise ValueError(f"{uri}: float32 rows of shape {rows.shape} do not fit a ({rows_total}, {1 + k}) "
                                 f"basis with {left[0]} rows left")
            pending[0].result()
            pending[0] = writer.submit(f.write, np.ascontiguousarray(rows).data)
            left[0] -= rows.shape[0]

        yield put
        pending[0].result()
        if left[0]:
            raise ValueError(f"{uri}: {left[0]} of {rows_total} rows were never written")


def load_shard(uri: str) -> Shard:
    """A shard file: memory-mapped when local, read into memory from S3."""
    from dwf_ray.weights import CheckpointError, read_header
    header, data_start = read_header(uri)
    info, meta = header.get(BASIS), header.get("__metadata__") or {}
    if info is None or info.get("dtype") != "F32" or "start" not in meta:
        raise CheckpointError(f"{uri}: not a PCA shard file (no float32 {BASIS!r} tensor with a start column)")
    shape = tuple(info["shape"])
    begin, end = (data_start + o for o in info["data_offsets"])
    if store.is_local(uri):
        basis = np.memmap(uri.removeprefix("file://"), dtype="<f4", mode="r", offset=begin, shape=shape)
    else:
        basis = np.frombuffer(store.read_range(uri, begin, end), dtype="<f4").reshape(shape)
    return Shard(int(meta["start"]), int(meta["stop"]), basis)
