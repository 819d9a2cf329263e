"""Transfer learning: swap a model's output head for a new task and fine-tune every weight.

Fine-tuning is ``zoo.train_classifier`` on the target task (AdamW, cosine schedule over the epoch budget);
it keeps the epoch with the best validation accuracy within the budget, and test data is only used
for the accuracy returned.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from dwf_ray.archs import ArchSpec, build_model
from dwf_ray.config import ZooConfig
from dwf_ray.data import dataset_for
from dwf_ray.accuracy import accuracy, recalibrate_batchnorm
from dwf_ray.weights import to_module
from dwf_ray.zoo import train_classifier


def find_head(model: nn.Module) -> str:
    """Name of the output head: the last ``nn.Linear`` registered in the model."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no nn.Linear module to use as the output head; "
                         f"pass the head's module name")
    return names[-1]


def replace_head(model: nn.Module, n_classes: int, seed: int, head: str | None = None) -> str:
    """Replace the head (default: ``find_head``) by a freshly initialised Linear with ``n_classes`` outputs.

    The new layer's initialisation depends only on ``seed``; every other weight is left as it was.
    Returns the head's module name.
    """
    head = head or find_head(model)
    try:
        old = model.get_submodule(head)
    except AttributeError as exc:
        raise ValueError(f"{type(model).__name__} has no module {head!r} to use as the output head") from exc
    if not isinstance(old, nn.Linear):
        raise ValueError(f"head {head!r} of {type(model).__name__} is a {type(old).__name__}, not nn.Linear")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        new = nn.Linear(old.in_features, n_classes, bias=old.bias is not None)
    parent_name, _, child = head.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return head


def fine_tune(model: nn.Module, target: ZooConfig, epochs: int, seed: int, head: str | None = None) -> float:
    """New head for ``target``'s classes, fine-tune all weights for ``epochs``; returns target test accuracy.

    ``seed`` fixes the new head's initialisation and the order of the training batches.
    """
    if epochs < 1:
        raise ValueError(f"fine-tuning needs at least one epoch, got {epochs}")
    data = dataset_for(target)
    replace_head(model, data.n_classes, seed, head)
    recalibrate_batchnorm(model, data.train)   # generated checkpoints carry no BatchNorm statistics
    train_classifier(model, target.model_copy(update={"epochs": epochs}), seed)
    return accuracy(model, data.test)


def source_model(arch: ArchSpec | dict | str, state: dict[str, np.ndarray] | None, init_seed: int = 0) -> nn.Module:
    """The model to transfer from: ``state`` loaded into ``arch``, or a random initialisation when None."""
    arch = ArchSpec.parse(arch)
    if state is not None:
        return to_module(arch, state)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        return build_model(arch)


def transfer_accuracies(arch: ArchSpec | dict | str, state: dict[str, np.ndarray] | None, target: ZooConfig,
                        budgets: list[int], seed: int, init_seed: int = 0, head: str | None = None) -> list[float]:
    """Target test accuracy after fine-tuning a fresh copy of the source model for each epoch budget."""
    return [fine_tune(source_model(arch, state, init_seed), target, epochs, seed, head) for epochs in budgets]
