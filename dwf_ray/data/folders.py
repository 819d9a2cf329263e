"""Datasets the user provides under a folder or s3:// prefix (``data_root``), in torchvision's on-disk formats.

Nothing is downloaded from the internet: files are read where they are (local) or copied once from S3 into a
local cache (``DWF_DATA_CACHE``, default ``~/.cache/dwf-ray/data``). Data is never code: pickled batches
(CIFAR-10's python layout) go through an unpickler that admits plain data only (docs/security.md).
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import zlib

import numpy as np

from dwf_ray import store


def fetch(uri: str) -> bytes:
    """A file's bytes; files on S3 are cached locally (written atomically) so each is downloaded once."""
    if store.is_local(uri):
        if not os.path.exists(uri.removeprefix("file://")):
            raise FileNotFoundError(f"{uri}: file not found")
        return store.read_bytes(uri)
    cache = os.path.join(os.environ.get("DWF_DATA_CACHE", os.path.expanduser("~/.cache/dwf-ray/data")),
                         hashlib.sha256(uri.encode()).hexdigest()[:20] + "-" + uri.rsplit("/", 1)[-1])
    if not os.path.exists(cache):
        if not store.exists(uri):
            raise FileNotFoundError(f"{uri}: file not found")
        store.write_bytes(cache, store.read_bytes(uri))
    return store.read_bytes(cache)


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (library messages may span several)."""
    return " ".join(str(exc).split())


def find_folder(data_root: str | None, dataset: str, folder: str, required: list[str]) -> str:
    """``data_root/folder`` (torchvision's layout) or ``data_root`` itself, whichever holds the required files."""
    if not data_root:
        raise ValueError(f"dataset {dataset!r} is read from a folder or S3 prefix: set zoo.data_root")
    for cand in (store.join(data_root, folder), data_root.rstrip("/")):
        if all(store.exists(store.join(cand, f)) or store.exists(store.join(cand, f + ".gz")) for f in required):
            return cand
    raise FileNotFoundError(f"{dataset}: expected {', '.join(required)} in {store.join(data_root, folder)} "
                            f"or {data_root} (torchvision's on-disk format; nothing is downloaded)")


# -- CIFAR-10 (python pickle batches, read by an unpickler that admits data only) ---------------------------
def _latin1_bytes(text: str, encoding: str) -> bytes:
    """``_codecs.encode`` as Python 3 writes bytes into a protocol-2 pickle, for that encoding only."""
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"asks for _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _batch_globals() -> dict[tuple[str, str], object]:
    """The only globals a CIFAR batch refers to: numpy's array reconstruction (numpy 1.x and 2.x module names,
    pickle protocols 2 to 5), numpy.ndarray, numpy.dtype, and the bytes of a protocol-2 pickle written by
    Python 3. Everything else in a batch (dict, list, str, bytes, int) needs no global."""
    from numpy._core import multiarray, numeric
    allowed: dict[tuple[str, str], object] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                                              ("_codecs", "encode"): _latin1_bytes}
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle asked for a global that data never needs (a function or class that could run code)."""


class UnsafeFile(PermissionError, ValueError):
    """A file refused because reading it could run code. A PermissionError, so that ``dwf`` reports it as one
    line (exit code 2) as it does access denied; a ValueError, as every bad input file."""


class _BatchUnpickler(pickle.Unpickler):
    """Admits the globals of ``_batch_globals`` only; any other is refused before it is looked up."""
    allowed = _batch_globals()

    def find_class(self, module: str, name: str):
        if (module, name) not in self.allowed:
            raise RefusedGlobal(f"{module}.{name}")
        return self.allowed[(module, name)]


def load_pickled_batch(raw: bytes, uri: str) -> dict:
    """A dataset batch pickled as a dict of numpy arrays, lists, strings and numbers (CIFAR-10/100's python
    layout); keys as str. A pickle that asks for anything else is refused with one line naming the file and
    the global, and nothing in it runs."""
    try:
        obj = _BatchUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except RefusedGlobal as exc:
        raise UnsafeFile(f"{uri}: refused: the pickle asks for the Python global {exc}, and a dataset batch holds "
                         f"only numpy arrays, lists, strings and numbers (nothing in it was run)") from exc
    except Exception as exc:  # a malformed pickle raises many error types; each is a bad file
        raise ValueError(f"{uri}: not a CIFAR-10 python batch ({type(exc).__name__}: {one_line(exc)})") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{uri}: not a CIFAR-10 python batch (a pickled {type(obj).__name__}, not a dict)")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_batch(uri: str) -> tuple[np.ndarray, np.ndarray]:
    d = load_pickled_batch(fetch(uri), uri)
    try:
        x = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        y = np.asarray(d["labels"], dtype=np.int64).reshape(-1)
    except (KeyError, ValueError, TypeError, OverflowError) as exc:
        raise ValueError(f"{uri}: not a CIFAR-10 python batch ({type(exc).__name__}: {one_line(exc)})") from exc
    if len(x) != len(y):
        raise ValueError(f"{uri}: {len(x)} images but {len(y)} labels")
    return x, y


def load_cifar10(data_root: str | None):
    """((train images, labels), (test images, labels)); images uint8 (N, 3, 32, 32)."""
    train_files = [f"data_batch_{i}" for i in range(1, 6)]
    folder = find_folder(data_root, "cifar10", "cifar-10-batches-py", train_files + ["test_batch"])
    parts = [_cifar_batch(store.join(folder, f)) for f in train_files]
    train = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    return train, _cifar_batch(store.join(folder, "test_batch"))


# -- MNIST / Fashion-MNIST (IDX files, optionally gzipped) ------------------------------------------------
def read_idx(uri: str) -> np.ndarray:
    """An IDX array of unsigned bytes (the MNIST file format)."""
    raw = fetch(uri)
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise ValueError(f"{uri}: not a readable gzip file ({type(exc).__name__}: {one_line(exc)})") from exc
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise ValueError(f"{uri}: not an IDX file of unsigned bytes")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    body = raw[4 + 4 * ndim:]
    if len(body) != int(np.prod(shape)):
        raise ValueError(f"{uri}: header says shape {shape} but holds {len(body)} bytes")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def _idx_file(folder: str, name: str) -> str:
    uri = store.join(folder, name)
    return uri if store.exists(uri) else uri + ".gz"


def load_mnist(data_root: str | None, folder: str = "MNIST/raw", dataset: str = "mnist"):
    """((train images, labels), (test images, labels)); images uint8 (N, 1, 28, 28)."""
    names = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    folder = find_folder(data_root, dataset, folder, names)
    xtr, ytr, xte, yte = (read_idx(_idx_file(folder, n)) for n in names)
    for x, y, n in ((xtr, ytr, names[0]), (xte, yte, names[2])):
        if len(x) != len(y):
            raise ValueError(f"{store.join(folder, n)}: {len(x)} images but {len(y)} labels")
    return (xtr[:, None], ytr.astype(np.int64)), (xte[:, None], yte.astype(np.int64))


def load_fashion_mnist(data_root: str | None):
    return load_mnist(data_root, "FashionMNIST/raw", "fashion-mnist")


# -- STL-10 (binary files; the labelled train and test splits) -------------------------------------------
def _stl_split(folder: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    x_uri, y_uri = store.join(folder, f"{split}_X.bin"), store.join(folder, f"{split}_y.bin")
    x, y = np.frombuffer(fetch(x_uri), dtype=np.uint8), np.frombuffer(fetch(y_uri), dtype=np.uint8)
    if x.size % (3 * 96 * 96) or x.size // (3 * 96 * 96) != y.size:
        raise ValueError(f"{x_uri}: {x.size} bytes do not hold one 3x96x96 image per label of {y_uri} ({y.size})")
    x = x.reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2)     # stored column-major
    return np.ascontiguousarray(x), y.astype(np.int64) - 1   # labels on disk are 1..10


def load_stl10(data_root: str | None):
    """((train images, labels), (test images, labels)); images uint8 (N, 3, 96, 96)."""
    folder = find_folder(data_root, "stl10", "stl10_binary", ["train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin"])
    return _stl_split(folder, "train"), _stl_split(folder, "test")


# name -> (loader, image shape, number of classes)
IMAGE_FOLDERS = {"cifar10": (load_cifar10, (3, 32, 32), 10), "mnist": (load_mnist, (1, 28, 28), 10),
                 "fashion-mnist": (load_fashion_mnist, (1, 28, 28), 10), "stl10": (load_stl10, (3, 96, 96), 10)}


def find_parquet(data_root: str | None, dataset: str, split: str) -> list[str]:
    """Parquet files of a split under ``data_root`` (searched recursively): names starting with ``split``."""
    if not data_root:
        raise ValueError(f"dataset {dataset!r} is read from a folder or S3 prefix: set zoo.data_root")
    found = [f for f in store.list_files(data_root, (".parquet",)) if f.rsplit("/", 1)[-1].startswith(split)]
    if not found:
        raise FileNotFoundError(f"{dataset}: no {split} Parquet file (name starting with {split!r}) under {data_root}")
    return found
