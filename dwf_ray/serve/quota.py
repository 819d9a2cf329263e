"""The bound on what ``format: uri`` requests write under a run root's ``served/`` folder.

A request is admitted when the bytes already there (measured on the store, so every replica's and every earlier
run's output counts, and what an operator deletes is freed) plus an upper bound of what the request writes fit
``ServeConfig.max_served_bytes``. Within a replica the check and the write hold one lock, so concurrent requests
never pass the quota together; replicas do not share that lock (see docs/security.md).
"""
from __future__ import annotations

import threading
from contextlib import contextmanager

import fsspec

from dwf_ray import store
from dwf_ray.serve.wire import header_bytes_per_model

MANIFEST_FIXED_BYTES = 16 * 1024    # a manifest.parquet's schema, metadata and footer (about 5 KiB measured)
MANIFEST_ROW_BYTES = 256            # one row's id, sha256, counts and status, uncompressed (its uri apart)
REQUEST_ID_BYTES = 64               # "/<time>-<hex>/g00000.safetensors" after the served folder


class QuotaExceeded(Exception):
    """A format=uri request that would take the served folder past its quota."""

    def __init__(self, served: str, used: int, need: int, quota: int):
        super().__init__(f"format=uri output under {served} is limited to {quota} bytes (max_served_bytes); "
                         f"{used} are used and this request needs up to {need}: ask for fewer models, use "
                         f"format=safetensors, or free space there")
        self.used, self.need, self.quota = used, need, quota


def folder_bytes(uri: str) -> int:
    """Bytes of every file below a folder or prefix (0 when there is none)."""
    fs, path = fsspec.core.url_to_fs(uri)
    if not store.is_local(uri):
        fs.invalidate_cache(path)
    return int(fs.du(path, total=True)) if fs.exists(path) else 0


def uri_bytes_bound(n: int, layout, arch, served: str) -> int:
    """An upper bound of what a format=uri request of ``n`` models of ``arch`` (its WeightLayout ``layout``)
    writes under ``served``: n safetensors checkpoints, their manifest.parquet and request.json."""
    arch_json = 2 * len(arch.to_json())     # JSON-escaped inside another JSON string: at most twice as long
    header = header_bytes_per_model([(e.name, e.shape) for e in layout.entries], 1, layout.size)
    checkpoint = 4 * layout.size + header + arch_json + 64
    manifest = MANIFEST_FIXED_BYTES + arch_json + n * (len(served) + REQUEST_ID_BYTES + MANIFEST_ROW_BYTES)
    return n * checkpoint + manifest + arch_json + 1024


class ServedQuota:
    """``max_served_bytes`` of one served folder, checked against what the store holds."""

    def __init__(self, served: str, quota: int):
        self.served, self.quota, self.lock = served, quota, threading.Lock()

    def check(self, need: int) -> None:
        """Raise QuotaExceeded unless ``need`` more bytes fit."""
        used = folder_bytes(self.served)
        if used + need > self.quota:
            raise QuotaExceeded(self.served, used, need, self.quota)

    @contextmanager
    def admit(self, need: int):
        """Check, then hold the lock while the caller writes at most ``need`` bytes."""
        with self.lock:
            self.check(need)
            yield
