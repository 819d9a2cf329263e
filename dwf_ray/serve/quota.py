"""The bounds on what ``format: uri`` requests write under a run root's ``served/`` folder: bytes
(``ServeConfig.max_served_bytes``) and checkpoints (``max_served_models``, which also bounds the listing each
check makes).

A request is admitted when what the store already holds there (every replica's and every earlier run's output
counts, and what an operator deletes is freed) plus an upper bound of what the request writes fit both. Within a
replica the check and the write hold one lock, so concurrent requests never pass a bound together; replicas do
not share that lock (see docs/security.md).
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass

import fsspec

from dwf_ray import store
from dwf_ray.serve.wire import header_bytes_per_model

MANIFEST_FIXED_BYTES = 16 * 1024    # a manifest.parquet's schema, metadata and footer (about 5 KiB measured)
MANIFEST_ROW_BYTES = 256            # one row's id, sha256, counts and status, uncompressed (its uri apart)
REQUEST_ID_BYTES = 64               # "/<time>-<hex>/g00000.safetensors" after the served folder


@dataclass(frozen=True)
class Usage:
    nbytes: int         # every file
    models: int         # .safetensors checkpoints


class QuotaExceeded(Exception):
    """A format=uri request that would take the served folder past one of its bounds."""

    def __init__(self, served: str, used: Usage, need: Usage, quota: Usage):
        over = [f"{name} ({limit}; {have} used, this request needs up to {more})"
                for name, limit, have, more in (("max_served_bytes", quota.nbytes, used.nbytes, need.nbytes),
                                                ("max_served_models", quota.models, used.models, need.models))
                if have + more > limit]
        super().__init__(f"format=uri output under {served} is past {' and '.join(over)}: ask for fewer models, "
                         f"use format=safetensors, or free space there")
        self.used, self.need, self.quota = used, need, quota


def usage(uri: str) -> Usage:
    """What a folder or prefix holds (nothing when it does not exist), from one listing."""
    fs, path = fsspec.core.url_to_fs(uri)
    if not store.is_local(uri):
        fs.invalidate_cache(path)
    files = list(fs.find(path, detail=True).values()) if fs.exists(path) else []
    return Usage(sum(int(f["size"]) for f in files), sum(f["name"].endswith(".safetensors") for f in files))


def uri_bytes_bound(n: int, layout, arch, served: str) -> int:
    """An upper bound of what a format=uri request of ``n`` models of ``arch`` (its WeightLayout ``layout``)
    writes under ``served``: n safetensors checkpoints, their manifest.parquet and request.json."""
    arch_json = 2 * len(arch.to_json())     # JSON-escaped inside another JSON string: at most twice as long
    header = header_bytes_per_model([(e.name, e.shape) for e in layout.entries], 1, layout.size)
    checkpoint = 4 * layout.size + header + arch_json + 64
    manifest = MANIFEST_FIXED_BYTES + arch_json + n * (len(served) + REQUEST_ID_BYTES + MANIFEST_ROW_BYTES)
    return n * checkpoint + manifest + arch_json + 1024


class ServedQuota:
    """The bounds of one served folder, checked against what the store holds."""

    def __init__(self, served: str, max_bytes: int, max_models: int):
        self.served, self.quota, self.lock = served, Usage(max_bytes, max_models), threading.Lock()

    def check(self, need: Usage) -> None:
        """Raise QuotaExceeded unless ``need`` more fits."""
        used = usage(self.served)
        if used.nbytes + need.nbytes > self.quota.nbytes or used.models + need.models > self.quota.models:
            raise QuotaExceeded(self.served, used, need, self.quota)

    @contextmanager
    def admit(self, need: Usage):
        """Check, then hold the lock while the caller writes at most ``need``."""
        with self.lock:
            self.check(need)
            yield
