"""Dataset ``zoo``: the data a public Model Zoo was trained on, its own ``dataset.pt`` beside the model folders
(``zoo.data_root`` is the zoo folder, local or s3://).

The file is a ``torch.save`` of a dict with ``trainset``, ``valset`` (may be None) and ``testset``
``TensorDataset``s (inputs already scaled as the zoo's models saw them) and ``dataset_seed``. It is read with
``torch.load(weights_only=True)`` with ``TensorDataset`` as the one class allowed beyond tensors and containers:
a file that asks for anything else is refused in one line naming it and the global. The splits are the zoo's; when
it has no validation split, ``val_fraction`` of the training split is held out (stratified, ``zoo.split_seed``).
"""
from __future__ import annotations

import numpy as np
import torch

from dwf_ray import store
from dwf_ray.data import Dataset, Split, _stratified

DATASET_FILE = "dataset.pt"


def read_zoo_splits(data_root: str | None) -> dict[str, tuple[np.ndarray, np.ndarray] | None]:
    """``{"trainset", "valset", "testset"}`` -> (x float32, y int64), or None for an absent split."""
    from torch.utils.data import TensorDataset

    from dwf_ray.weights import torch_load_data
    if not data_root:
        raise ValueError("dataset 'zoo' reads dataset.pt from the zoo folder: set zoo.data_root to it")
    uri = store.join(data_root, DATASET_FILE)
    with torch.serialization.safe_globals([TensorDataset]):
        obj = torch_load_data(store.read_bytes(uri), uri)
    if not isinstance(obj, dict):
        raise ValueError(f"{uri}: expected a dict of trainset/valset/testset, found {type(obj).__name__}")
    out = {}
    for key in ("trainset", "valset", "testset"):
        part = obj.get(key)
        if part is None and key == "valset":
            out[key] = None
            continue
        if not isinstance(part, TensorDataset) or len(part.tensors) != 2:
            raise ValueError(f"{uri}: {key} must be a TensorDataset of (inputs, labels), found "
                             f"{type(part).__name__}")
        x, y = part.tensors
        if y.dtype.is_floating_point or y.dim() != 1 or len(y) != len(x) or len(y) == 0 or int(y.min()) < 0:
            raise ValueError(f"{uri}: {key} labels must be a non-empty vector of class ids >= 0, one per input")
        out[key] = (x.float().numpy(), y.long().numpy())
    if out["valset"] is not None and len(out["valset"][1]) == 0:
        out["valset"] = None
    return out


def zoo_dataset(data_root: str | None, split_seed: int, val_fraction: float, classes) -> Dataset:
    """The zoo's train/val/test splits as a :class:`Dataset`."""
    if classes is not None:
        raise ValueError("dataset 'zoo': zoo.classes is not supported (the zoo's models were trained on all of them)")
    parts = read_zoo_splits(data_root)
    train, val, test = parts["trainset"], parts["valset"], parts["testset"]
    if val is None:
        val_idx, train_idx = _stratified(train[1], np.random.default_rng(split_seed), [val_fraction])
        train, val = (train[0][np.sort(train_idx)], train[1][np.sort(train_idx)]), \
            (train[0][np.sort(val_idx)], train[1][np.sort(val_idx)])
    n_classes = int(max(p[1].max() for p in (train, val, test))) + 1

    def split(part) -> Split:
        return Split(torch.from_numpy(np.ascontiguousarray(part[0])), torch.from_numpy(part[1]))

    return Dataset("zoo", split(train), split(val), split(test), n_classes, tuple(train[0].shape[1:]))
