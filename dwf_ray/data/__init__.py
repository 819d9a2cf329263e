"""Dataset registry with fixed, seeded train/val/test splits.

- bundled: scikit-learn ``digits`` (64 features, or 1x8x8 images) and ``iris``;
- ``text-synth``: a generated review-sentiment task (token ids), shipped as code;
- ``mnist1d``: MNIST-1D (Greydanus 2020), 40-sample signals built offline by the ``mnist1d`` package's own
  generator from its templates (never its download or pickle cache); ``num_train`` (default 4,000, the published
  split) and ``num_test`` (default 10,000) signals from one draw, validation carved from the training part;
- ``cifar10``, ``mnist``, ``fashion-mnist``, ``stl10``: torchvision's on-disk formats under ``zoo.data_root``
  (a folder or s3:// prefix); validation split drawn from the official train set, test = official test set;
- ``text-parquet``: Parquet files (columns text, label) named train*/test* under ``zoo.data_root``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch


@dataclass
class Split:
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class Dataset:
    name: str
    train: Split
    val: Split
    test: Split
    n_classes: int
    input_shape: tuple[int, ...]
    vocab_size: int | None = None     # token datasets: inputs are int64 ids in [0, vocab_size), pad id 0


# dataset name -> (kind, default dataset_args); every key a dataset accepts has a default here
_TEXT_ARGS = {"max_len": 128, "vocab_size": 30522, "tokenizer": None, "val_fraction": 0.1, "max_train": None}
DATASETS: dict[str, tuple[str, dict]] = {
    "digits": ("features", {}),
    "iris": ("features", {}),
    "text-synth": ("text", {"n": 6000, "seed": 0, "label_noise": 0.04, "max_len": 20, "vocab_size": 1000,
                            "tokenizer": None}),
    "text-parquet": ("text", {**_TEXT_ARGS, "text_column": "text", "label_column": "label"}),
    "mnist1d": ("signal", {"num_train": 4000, "num_test": 10000, "seed": 42, "val_fraction": 0.1}),
    **{name: ("image", {"val_fraction": 0.1, "max_train": None})
       for name in ("cifar10", "mnist", "fashion-mnist", "stl10")},
    "zoo": ("tensors", {"val_fraction": 0.1}),   # a Model Zoo's own dataset.pt (dwf_ray/data/modelzoo.py)
}


def dataset_for(zoo_cfg) -> Dataset:
    """The dataset a ZooConfig names (every stage loads its data through here)."""
    classes = tuple(zoo_cfg.classes) if zoo_cfg.classes is not None else None
    return load_dataset(zoo_cfg.dataset, zoo_cfg.split_seed, image=zoo_cfg.image, classes=classes,
                        data_root=zoo_cfg.data_root, args_json=json.dumps(zoo_cfg.dataset_args, sort_keys=True))


def input_shape(zoo_cfg) -> tuple[int, ...]:
    """The shape of one input example of the dataset a ZooConfig names, known without loading the data."""
    args = dataset_args(zoo_cfg.dataset, zoo_cfg.dataset_args)
    kind = DATASETS[zoo_cfg.dataset][0]
    if kind == "text":
        return (args["max_len"],)
    if kind == "image":
        from dwf_ray.data.folders import IMAGE_FOLDERS
        return IMAGE_FOLDERS[zoo_cfg.dataset][1]
    if kind == "signal":
        return (MNIST1D_LENGTH,)
    return (1, 8, 8) if zoo_cfg.image else {"digits": (64,), "iris": (4,)}[zoo_cfg.dataset]


def dataset_args(name: str, given: dict) -> dict:
    """The dataset's arguments: its defaults updated by ``given`` (unknown keys are an error)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; datasets: {', '.join(DATASETS)}")
    defaults = DATASETS[name][1]
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"dataset {name!r} has no arguments {unknown}; it takes {sorted(defaults) or 'none'}")
    args = {**defaults, **given}
    if name == "mnist1d":
        _check_mnist1d_args(args)
    return args


MNIST1D_LENGTH = 40     # samples per signal (the package's final_seq_length)


def _check_mnist1d_args(args: dict) -> None:
    def bad(key: str, allowed: str):
        raise ValueError(f"dataset 'mnist1d': {key}={args[key]!r} is out of range (allowed: {allowed})")
    for key, low in (("num_train", 100), ("num_test", 10)):
        if not isinstance(args[key], int) or isinstance(args[key], bool) or not low <= args[key] <= 1_000_000:
            bad(key, f"an integer from {low} to 1,000,000")
    if not isinstance(args["seed"], int) or isinstance(args["seed"], bool) or not 0 <= args["seed"] < 2 ** 32:
        bad("seed", "an integer from 0 to 2**32 - 1")
    if not isinstance(args["val_fraction"], (int, float)) or not 0 < args["val_fraction"] < 1:
        bad("val_fraction", "a fraction in (0, 1)")


def mnist1d_signals(num_train: int, num_test: int, seed: int):
    """((train x, y), (test x, y)) from the package's generator: one draw of num_train + num_test signals (rounded
    up to whole classes), standardised together as the package does. The generator seeds NumPy's and Python's
    global random state; both are restored afterwards."""
    total = num_train + num_test
    samples = -(-total // 10) * 10      # the generator makes whole classes
    x, y = _cached_npz(f"mnist1d-{samples}-{seed}", lambda: _make_mnist1d(samples, seed),
                       ((samples, MNIST1D_LENGTH), (samples,)))
    return (x[:num_train], y[:num_train]), (x[num_train:total], y[num_train:total])


def _make_mnist1d(num_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    import random
    from mnist1d.data import get_dataset_args, make_dataset
    args = get_dataset_args()
    args.num_samples, args.train_split, args.seed = num_samples, 1.0, seed
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return data["x"].astype(np.float32), data["y"].astype(np.int64)


def _cached_npz(key: str, make, shapes: tuple) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of ``shapes``, made once per machine: kept as a plain .npz (no pickles) under DWF_CACHE_DIR (default: the system's
    temporary folder), written atomically, so that every Ray worker does not build the same set again."""
    import os
    import tempfile
    folder = os.environ.get("DWF_CACHE_DIR") or os.path.join(tempfile.gettempdir(), "dwf-ray-cache")
    path = os.path.join(folder, f"{key}.npz")
    try:
        with np.load(path, allow_pickle=False) as f:
            x, y = f["x"], f["y"]
        if (x.shape, y.shape) == shapes and x.dtype == np.float32 and y.dtype == np.int64:
            return x, y
    except (OSError, ValueError, KeyError):
        pass    # absent, unreadable or not what it should be: make it again
    x, y = make()
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".npz")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, x=x, y=y)
        os.replace(tmp, path)
    except OSError:
        pass    # a read-only machine: no cache, same data
    return x, y


def _source(name: str, data_root: str | None, args: dict):
    """(x, y) to split three ways, or ((train x, y), (official test x, y)). x: features, uint8 images or texts."""
    if name in ("digits", "iris"):
        from sklearn import datasets
        d = datasets.load_digits() if name == "digits" else datasets.load_iris()
        return (d.data.astype(np.float32), d.target), None
    if name == "mnist1d":
        return mnist1d_signals(args["num_train"], args["num_test"], args["seed"])
    if name == "text-synth":
        from dwf_ray.data.text import synth_reviews
        return synth_reviews(args["n"], args["seed"], args["label_noise"]), None
    if name == "text-parquet":
        from dwf_ray.data.folders import find_parquet
        from dwf_ray.data.text import read_parquet_texts
        cols = args["text_column"], args["label_column"]
        train = read_parquet_texts(find_parquet(data_root, name, "train"), *cols)
        test = read_parquet_texts(find_parquet(data_root, name, "test"), *cols)
        return _label_ids(train, test, data_root)
    from dwf_ray.data.folders import IMAGE_FOLDERS
    return IMAGE_FOLDERS[name][0](data_root)


def _label_ids(train, test, where):
    """Integer labels as they are; other labels (strings) numbered in sorted order of the training labels."""
    (xtr, ytr), (xte, yte) = train, test
    if np.issubdtype(ytr.dtype, np.integer) and np.issubdtype(yte.dtype, np.integer):
        if min(ytr.min(), yte.min()) < 0:
            raise ValueError(f"{where}: labels must be >= 0")
        return (xtr, ytr.astype(np.int64)), (xte, yte.astype(np.int64))
    names = sorted(set(ytr.tolist()))
    unseen = sorted(set(yte.tolist()) - set(names))
    if unseen:
        raise ValueError(f"{where}: test labels {unseen[:5]} never occur in the training files")
    ids = {v: i for i, v in enumerate(names)}
    return (xtr, np.array([ids[v] for v in ytr])), (xte, np.array([ids[v] for v in yte]))


def _keep_classes(part, classes, name):
    x, y = part
    unknown = sorted(set(classes) - set(np.unique(y).tolist()))
    if unknown:
        raise ValueError(f"dataset {name!r} has no classes {unknown}")
    keep = np.isin(y, classes)
    relabel = np.full(int(max(y.max(), max(classes))) + 1, -1)
    relabel[list(classes)] = np.arange(len(classes))
    return x[keep], relabel[y[keep]]


def _stratified(y: np.ndarray, rng: np.random.Generator, fractions: list[float]) -> list[np.ndarray]:
    """Per class: the first parts take ``fractions`` of its examples (rounded), the last part the rest."""
    parts: list[list[np.ndarray]] = [[] for _ in range(len(fractions) + 1)]
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        start = 0
        for i, f in enumerate(fractions):
            n = round(len(idx) * f)
            parts[i].append(idx[start:start + n])
            start += n
        parts[-1].append(idx[start:])
    return [np.concatenate(p) for p in parts]


def _model_inputs(kind: str, parts: dict, args: dict, image: bool) -> tuple[dict, tuple, int | None]:
    """(the splits as model inputs, their shape, the vocabulary size): texts tokenized by the training split's
    tokenizer (or a given file), images scaled per channel by the training split's statistics, features as
    they are (digits as 1x8x8 images when ``image``)."""
    if kind == "text":
        from dwf_ray.data.text import build_tokenizer, encode, load_tokenizer
        tok = (load_tokenizer(args["tokenizer"], args["max_len"]) if args.get("tokenizer")
               else build_tokenizer(parts["train"][0], args["vocab_size"], args["max_len"]))
        return {k: (encode(tok, t), lab) for k, (t, lab) in parts.items()}, (args["max_len"],), tok.get_vocab_size()
    if kind == "image":
        train_x = parts["train"][0]
        axes = (0, 2, 3)
        mu = (train_x.mean(axes, dtype=np.float64)[:, None, None] / 255).astype(np.float32)
        sd = np.maximum(train_x.std(axes, dtype=np.float64)[:, None, None] / 255, 1e-3).astype(np.float32)
        return ({k: ((xs.astype(np.float32) / 255 - mu) / sd, lab) for k, (xs, lab) in parts.items()},
                tuple(train_x.shape[1:]), None)
    shape = (1, 8, 8) if image else tuple(parts["train"][0].shape[1:])
    return {k: (xs.reshape(-1, *shape), lab) for k, (xs, lab) in parts.items()}, shape, None


@lru_cache(maxsize=8)
def load_dataset(name: str, split_seed: int = 0, val_fraction: float = 0.2, test_fraction: float = 0.2,
                 image: bool = False, classes: tuple[int, ...] | None = None, data_root: str | None = None,
                 args_json: str = "{}") -> Dataset:
    """Load a dataset; the split depends only on ``split_seed`` (stratified per class).

    Datasets without an official test set (bundled, text-synth) are split ``test_fraction`` /
    ``val_fraction`` / rest; the others take ``val_fraction`` of their train set (dataset argument, default 0.1).
    Features are standardised with the training split's mean and std (floored at 0.1), images per channel;
    texts are tokenized by a word-level tokenizer learnt from the training split (or a given tokenizer file).
    ``image=True`` reshapes digits to 1x8x8 images for convolutional and attention models.
    ``classes`` keeps only those classes, relabelled 0..len(classes)-1 in the order given.
    """
    args = dataset_args(name, json.loads(args_json))
    kind = DATASETS[name][0]
    if kind == "tensors":
        from dwf_ray.data.modelzoo import zoo_dataset
        return zoo_dataset(data_root, split_seed, args["val_fraction"], classes)
    if image and name != "digits" and kind != "image":
        raise ValueError(f"dataset {name!r} has no image form")
    pool, test = _source(name, data_root, args)
    if classes is not None:
        pool = _keep_classes(pool, classes, name)
        test = _keep_classes(test, classes, name) if test is not None else None
    rng = np.random.default_rng(split_seed)
    if args.get("max_train") and len(pool[1]) > args["max_train"]:
        keep = np.sort(rng.permutation(len(pool[1]))[:args["max_train"]])
        pool = pool[0][keep], pool[1][keep]
    x, y = pool
    if test is None:
        test_idx, val_idx, train_idx = _stratified(y, rng, [test_fraction, val_fraction])
    else:
        val_idx, train_idx = _stratified(y, rng, [args["val_fraction"]])
    if kind == "features":   # standardised with training-split statistics only
        mu, sd = x[train_idx].mean(0), np.maximum(x[train_idx].std(0), 0.1)
        x = ((x - mu) / sd).astype(np.float32)
    parts = {k: (x[np.sort(i)], y[np.sort(i)]) for k, i in (("train", train_idx), ("val", val_idx))}
    parts["test"] = test if test is not None else (x[np.sort(test_idx)], y[np.sort(test_idx)])
    for key, (_, labels) in parts.items():
        if len(labels) == 0:
            raise ValueError(f"dataset {name!r}: the {key} split is empty ({len(y)} examples to split; "
                             f"val_fraction {args.get('val_fraction', val_fraction)})")
    n_classes = len(classes) if classes is not None else int(max(int(p[1].max()) for p in parts.values())) + 1
    parts, shape, vocab_size = _model_inputs(kind, parts, args, image)

    def split(key: str) -> Split:
        xs, ys = parts[key]
        return Split(torch.from_numpy(np.ascontiguousarray(xs)), torch.from_numpy(np.asarray(ys, dtype=np.int64)))

    return Dataset(name, split("train"), split("val"), split("test"), n_classes, shape, vocab_size)
