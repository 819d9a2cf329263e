"""Many small models of one family trained as one, with ``torch.func``: their parameters stacked, the forward
``vmap``-ed, one AdamW step for all. AdamW acts element by element and each model's loss depends only on its own
parameters, so every model follows the same path as when trained alone (``zoo.train_classifier``): its own seed for
initialisation and data order, its own best epoch on validation data, up to float rounding.

Families with buffers (BatchNorm running statistics) or random layers (dropout) are not trained this way; they
train one model at a time (``LOCKSTEP_FAMILIES`` lists those that are).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap

from dwf_ray.archs import ArchSpec, build_model

LOCKSTEP_FAMILIES = ("mlp", "cnn1d")     # no buffers, no dropout: verified to train as when alone (tests/test_zoo.py)
EVAL_EXAMPLES = 2048                     # examples per forward when scoring a chunk (bounds activation memory)


def lockstep_problem(arch: ArchSpec) -> str | None:
    """Why models of ``arch`` cannot be trained in lockstep, or None when they can."""
    if arch.family not in LOCKSTEP_FAMILIES:
        return (f"family {arch.family!r} cannot be trained in lockstep (only {', '.join(LOCKSTEP_FAMILIES)}: "
                f"no BatchNorm statistics, no dropout); set zoo.models_per_task=1")
    return None


@dataclass
class ChunkResult:
    states: list[dict]            # per model: name -> float32 array (its best epoch on validation data)
    diverged: list[int | None]    # per model: the first epoch whose training loss was not finite, or None


class Lockstep:
    """The stacked parameters of ``len(seeds)`` models and a vmapped forward over them."""

    def __init__(self, arch: ArchSpec, seeds: list[int], init: list[nn.Module] | None = None):
        models = init or [self._seeded(arch, s) for s in seeds]
        self.params, _ = stack_module_state(models)
        self.template = copy.deepcopy(models[0]).to("meta")

    @staticmethod
    def _seeded(arch: ArchSpec, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return build_model(arch)

    def _one(self, params: dict, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.template, params, (x,))

    def logits(self, x: torch.Tensor, params: dict | None = None) -> torch.Tensor:
        """x (M, B, ...): each model its own batch -> (M, B, classes)."""
        return vmap(self._one)(params or self.params, x)

    @torch.no_grad()
    def accuracy(self, x: torch.Tensor, y: torch.Tensor, params: dict | None = None) -> torch.Tensor:
        """(M,) accuracies of every model on one shared split, in slices of EVAL_EXAMPLES examples."""
        correct = 0
        for a in range(0, len(y), EVAL_EXAMPLES):
            xs = x[a:a + EVAL_EXAMPLES]
            out = vmap(self._one, in_dims=(0, None))(params or self.params, xs)
            correct = correct + (out.argmax(-1) == y[a:a + EVAL_EXAMPLES]).sum(1)
        return correct.double() / len(y)


def lr_schedule(opt: torch.optim.Optimizer, cfg, n_train: int) -> torch.optim.lr_scheduler.LRScheduler:
    """``zoo.lr_schedule``: cosine from ``zoo.lr`` to 0 over every step of training, or constant."""
    if cfg.lr_schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.epochs * -(-n_train // cfg.batch_size))


def train_lockstep(arch: ArchSpec, cfg, seeds: list[int], data, init: list[nn.Module] | None = None) -> ChunkResult:
    """Train one model per seed on ``data`` (a Dataset) with ``cfg`` (a ZooConfig), as ``train_classifier`` does
    for one: AdamW with its learning-rate schedule, per-model data order, each model's best epoch on validation data.
    ``init`` replaces the seeded initial models (tests)."""
    net = Lockstep(arch, seeds, init)
    m, n = len(seeds), len(data.train)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    opt = torch.optim.AdamW(net.params.values(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = lr_schedule(opt, cfg, n)
    best = {k: v.detach().clone() for k, v in net.params.items()}
    best_acc = torch.full((m,), -1.0, dtype=torch.float64)
    diverged: list[int | None] = [None] * m
    for epoch in range(cfg.epochs):
        order = torch.stack([torch.randperm(n, generator=g) for g in gens])
        for i in range(0, n, cfg.batch_size):
            idx = order[:, i:i + cfg.batch_size]
            out = net.logits(data.train.x[idx])
            loss = F.cross_entropy(out.flatten(0, 1), data.train.y[idx].flatten(), reduction="none")
            per_model = loss.view(m, -1).mean(1)
            opt.zero_grad()
            per_model.sum().backward()    # model j's gradient is that of its own mean loss
            opt.step()
            sched.step()
            for j in torch.nonzero(~torch.isfinite(per_model.detach())).flatten().tolist():
                diverged[j] = epoch if diverged[j] is None else diverged[j]
        val = net.accuracy(data.val.x, data.val.y)
        better = val > best_acc
        best_acc = torch.where(better, val, best_acc)
        for k, v in net.params.items():
            best[k][better] = v.detach()[better]
    states = [{k: v[j].numpy().copy() for k, v in best.items()} for j in range(m)]
    return ChunkResult(states, diverged)


def chunk_metrics(arch: ArchSpec, states: list[dict], data) -> list[dict]:
    """Train/val/test accuracy of every model of a chunk (as ``accuracy.accuracy`` gives for one model)."""
    net = Lockstep(arch, [0], [build_model(arch)])
    params = {k: torch.stack([torch.from_numpy(s[k]) for s in states]) for k in net.params}
    accs = {split: net.accuracy(getattr(data, split).x, getattr(data, split).y, params).tolist()
            for split in ("train", "val", "test")}
    return [{f"{split}_acc": accs[split][j] for split in accs} for j in range(len(states))]
