"""Run roots on local disk or S3: the atomic writer, ranged reads, manifests, saved configs, stage markers."""
from __future__ import annotations

import functools
import io
import json
import os
import uuid
from contextlib import contextmanager
from typing import Any

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq


# S3: give up on an endpoint that does not answer within seconds, not minutes
_S3_OPTIONS = {"config_kwargs": {"connect_timeout": 10, "read_timeout": 120, "retries": {"max_attempts": 3}}}


class StoreError(OSError):
    """An object-store problem a user can act on; the message names the bucket and key and what to check."""


class MissingObject(StoreError, FileNotFoundError):
    pass


class AccessDenied(StoreError, PermissionError):
    pass


class Unreachable(StoreError, ConnectionError):
    pass


def _fs(uri: str):
    fs, path = fsspec.core.url_to_fs(uri, **(_S3_OPTIONS if uri.startswith("s3://") else {}))
    return fs, path


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def explain(uri: str, exc: BaseException) -> BaseException:
    """The StoreError a user can act on for an exception raised by the object store at ``uri`` (the
    exception itself when it is not one of the store's)."""
    if isinstance(exc, StoreError) or is_local(uri):
        return exc
    bucket, _, key = uri.split("://", 1)[1].partition("/")
    where = f"{uri} (bucket {bucket!r}, key {key!r})"
    if isinstance(exc, PermissionError):
        return AccessDenied(f"{where}: access denied; check the credentials (AWS_ACCESS_KEY_ID, AWS_PROFILE, the "
                            f"node's role) and that the bucket policy allows this principal")
    if isinstance(exc, FileNotFoundError):
        if "bucket" in str(exc).lower():
            return MissingObject(f"{where}: bucket {bucket!r} does not exist; check its name, the region and "
                                 f"AWS_ENDPOINT_URL")
        return MissingObject(f"{where}: no such object; check the path, or run the stage that writes it")
    if type(exc).__module__.startswith(("botocore", "aiohttp")) and "connect" in type(exc).__name__.lower() + str(exc):
        endpoint = os.environ.get("AWS_ENDPOINT_URL", "the AWS endpoint")
        return Unreachable(f"{where}: the S3 endpoint {endpoint} does not answer; check AWS_ENDPOINT_URL, the "
                           f"network and any proxy")
    return exc


def _explained(fn):
    """Object-store errors of ``fn(uri, ...)`` become StoreErrors naming the bucket, key and what to check."""
    @functools.wraps(fn)
    def wrapper(uri: str, *args, **kwargs):
        try:
            return fn(uri, *args, **kwargs)
        except Exception as exc:
            explained = explain(uri, exc)
            if explained is exc:
                raise
            raise explained from exc
    return wrapper


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/")] + [p.strip("/") for p in parts if p])


@contextmanager
def atomic_writer(uri: str):
    """A binary file to write in order: a temp file renamed on success locally, a multipart upload on S3.

    Nothing is left at ``uri`` when the block raises.
    """
    fs, path = _fs(uri)
    if is_local(uri):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as f:
                yield f
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return
    f = fs.open(path, "wb")
    try:
        yield f
    except BaseException:
        f.discard()
        raise
    f.close()
    fs.invalidate_cache(path)


@_explained
def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object atomically: temp file + rename locally (``atomic_writer``), one PUT on S3."""
    if is_local(uri):
        with atomic_writer(uri) as f:
            f.write(data)
    else:
        fs, path = _fs(uri)
        fs.pipe_file(path, data)
        fs.invalidate_cache(path)


@_explained
def read_bytes(uri: str) -> bytes:
    fs, path = _fs(uri)
    return fs.cat_file(path)


@_explained
def read_range(uri: str, start: int, end: int) -> bytes:
    """Bytes [start, end) of an object (a ranged GET on S3)."""
    fs, path = _fs(uri)
    return fs.cat_file(path, start=start, end=end)


@_explained
def exists(uri: str) -> bool:
    fs, path = _fs(uri)
    if not is_local(uri):
        fs.invalidate_cache(path)
    return fs.exists(path)


@_explained
def remove(uri: str) -> None:
    fs, path = _fs(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


@_explained
def list_files(uri: str, suffixes: tuple[str, ...] = ()) -> list[str]:
    """Files below a folder or prefix, as full URIs, sorted."""
    fs, path = _fs(uri)
    if not is_local(uri):
        fs.invalidate_cache(path)
    proto = "" if is_local(uri) else uri.split("://", 1)[0] + "://"
    out = [proto + p for p in fs.find(path)]
    return sorted(u for u in out if not suffixes or u.endswith(suffixes))


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def write_table(uri: str, df: pd.DataFrame) -> None:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), buf)
    write_bytes(uri, buf.getvalue())


def read_table(uri: str) -> pd.DataFrame:
    return pq.read_table(io.BytesIO(read_bytes(uri))).to_pandas()


def _normalise(root: str) -> str:
    if is_local(root):
        root = os.path.abspath(root.removeprefix("file://"))
    return root.rstrip("/")


class RunStore:
    """One run root (``runs/<name>`` or ``s3://bucket/prefix``); every stage reads and writes under it.

    ``zoo_root``: where the zoo stage's outputs live when another run owns them (a variant sharing its zoo).
    """

    def __init__(self, root: str, zoo_root: str | None = None):
        self.root = _normalise(root)
        self.zoo_root = _normalise(zoo_root) if zoo_root else self.root

    def uri(self, *parts: str) -> str:
        return join(self.root, *parts)

    def stage_uri(self, stage: str, *parts: str) -> str:
        """A path inside a stage's folder (the zoo's may belong to another run root)."""
        return join(self.zoo_root if stage == "zoo" else self.root, STAGE_FOLDERS[stage], *parts)

    def manifest(self, stage: str) -> pd.DataFrame:
        return read_table(self.stage_uri(stage, "manifest.parquet"))

    def stage_seconds(self) -> dict[str, float]:
        """Seconds taken by each complete stage of this root (its own stages, not a shared zoo's)."""
        return {s: self.stage_info(f)["seconds"] for s, f in STAGE_FOLDERS.items() if s != "eval" and self.done(f)}

    def saved_config(self, config_type):
        """The config this run root was made with (its config.json as ``config_type``, a pydantic model), or None
        when it has none."""
        uri = self.uri(CONFIG)
        return config_type.model_validate(read_json(uri)) if exists(uri) else None

    def save_config(self, cfg) -> None:
        write_json(self.uri(CONFIG), cfg.model_dump())

    def info_if_done(self, stage: str, label: str, log) -> dict | None:
        """The saved info of a stage already complete in folder ``stage`` (logged as skipped under ``label``);
        None when it has to run."""
        if not self.done(stage):
            return None
        log(f"[{label}] complete in {self.uri(stage)}: skipped")
        return self.stage_info(stage)

    def done(self, stage: str) -> bool:
        return exists(self.uri(stage, "_SUCCESS"))

    def mark_done(self, stage: str, info: dict) -> None:
        write_json(self.uri(stage, "_SUCCESS"), info)

    def stage_info(self, stage: str) -> dict:
        return read_json(self.uri(stage, "_SUCCESS"))

    def clear(self, stage: str) -> None:
        remove(self.uri(stage))

    def __repr__(self) -> str:
        return f"RunStore({self.root!r})"


def pyarrow_storage(uri: str):
    """(path, pyarrow filesystem or None) for libraries that take pyarrow filesystems (Ray Train storage)."""
    if is_local(uri):
        return os.path.abspath(uri.removeprefix("file://")), None
    from pyarrow.fs import FSSpecHandler, PyFileSystem
    fs, path = _fs(uri)
    return path, PyFileSystem(FSSpecHandler(fs))


# Every stage's folder under a run root, in pipeline order (the pipeline maps each to its function).
STAGE_FOLDERS = {"zoo": "zoo", "canon": "canonical", "pca": "pca", "flow": "flow", "sample": "samples",
                 "eval": "report"}
CONFIG = "config.json"   # a run root's config, written when the run starts
NO_CANON = "nocanon"   # the sub-run without canonicalization that the report compares against


def ok_rows(manifest: pd.DataFrame) -> pd.DataFrame:
    """The usable rows of a manifest (status "ok"), in model_id order."""
    return manifest[manifest["status"] == "ok"].sort_values("model_id")


def counts(manifest: pd.DataFrame) -> dict:
    """Rows in, usable and failed: a stage's bookkeeping, which must add up."""
    ok = int((manifest["status"] == "ok").sum())
    return {"rows": len(manifest), "ok": ok, "error": len(manifest) - ok}
