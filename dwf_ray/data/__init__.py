"""Dataset registry: bundled scikit-learn data (digits, iris) with a fixed, seeded train/val/test split."""
from __future__ import annotations

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


def _bundled(name: str):
    from sklearn import datasets
    if name == "digits":
        d = datasets.load_digits()
        return d.data.astype(np.float32), d.target, (64,)
    if name == "iris":
        d = datasets.load_iris()
        return d.data.astype(np.float32), d.target, (4,)
    raise ValueError(f"unknown dataset {name!r}; bundled datasets: digits, iris")


def dataset_for(zoo_cfg) -> Dataset:
    """The dataset a ZooConfig names (every stage loads its data through here)."""
    classes = tuple(zoo_cfg.classes) if zoo_cfg.classes is not None else None
    return load_dataset(zoo_cfg.dataset, zoo_cfg.split_seed, image=zoo_cfg.image, classes=classes)


@lru_cache(maxsize=8)
def load_dataset(name: str, split_seed: int = 0, val_fraction: float = 0.2, test_fraction: float = 0.2,
                 image: bool = False, classes: tuple[int, ...] | None = None) -> Dataset:
    """Load a bundled dataset; the split depends only on ``split_seed`` (stratified per class).

    Features are standardised with the training split's mean and std (floored at 0.1).
    ``image=True`` reshapes digits to 1x8x8 images for convolutional and attention models.
    ``classes`` keeps only those classes, relabelled 0..len(classes)-1 in the order given.
    """
    x, y, shape = _bundled(name)
    if classes is not None:
        unknown = sorted(set(classes) - set(np.unique(y).tolist()))
        if unknown:
            raise ValueError(f"dataset {name!r} has no classes {unknown}")
        keep = np.isin(y, classes)
        relabel = {c: i for i, c in enumerate(classes)}
        x, y = x[keep], np.array([relabel[c] for c in y[keep]])
    rng = np.random.default_rng(split_seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_test, n_val = round(len(idx) * test_fraction), round(len(idx) * val_fraction)
        parts["test"].append(idx[:n_test])
        parts["val"].append(idx[n_test:n_test + n_val])
        parts["train"].append(idx[n_test + n_val:])
    train_idx = np.concatenate(parts["train"])
    mu, sd = x[train_idx].mean(0), np.maximum(x[train_idx].std(0), 0.1)
    x = ((x - mu) / sd).astype(np.float32)  # standardised with training-split statistics only
    if image:
        if name != "digits":
            raise ValueError(f"dataset {name!r} has no image form")
        shape = (1, 8, 8)

    def split(key: str) -> Split:
        idx = np.sort(np.concatenate(parts[key]))
        return Split(torch.from_numpy(x[idx].reshape(-1, *shape)), torch.from_numpy(y[idx].astype(np.int64)))

    return Dataset(name, split("train"), split("val"), split("test"), int(y.max()) + 1, shape)
