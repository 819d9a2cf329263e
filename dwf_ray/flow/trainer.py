"""One flow-matching optimiser (velocity net, EMA, AdamW and schedule on the path and loss of ``path.py`` and
``loss.py``), the checkpoint choice (``CheckpointChoice``, the one rule of both training runs), and a
single-process training run for benchmarks and tests."""
from __future__ import annotations

import copy
import math
import time
from typing import Callable

import numpy as np
import torch

from dwf_ray.config import FlowConfig
from dwf_ray.flow.model import build_velocity_net
from dwf_ray.flow.guidance import drop_labels
from dwf_ray.flow.loss import flow_matching_loss
from dwf_ray.flow.path import StraightPath


def lr_lambda(cfg: FlowConfig):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


class FlowTrainer:
    """One flow-matching optimiser: velocity net, its EMA copy, AdamW with warmup and the configured schedule.

    Shared by the Ray Train worker loop and by single-process runs (``train_in_process``).
    ``wrap`` prepares the net for distributed training (``ray.train.torch.prepare_model``: DDP).
    ``n_classes`` > 0 makes a conditional flow: ``step`` then takes labels, replaced by the null label with
    probability ``cfg.p_uncond`` (classifier-free guidance).
    """

    def __init__(self, cfg: FlowConfig, dim: int, wrap=None, n_classes: int = 0):
        torch.manual_seed(cfg.seed)
        self.cfg = cfg
        self.net = build_velocity_net(cfg, dim, n_classes)
        self.ema = copy.deepcopy(self.net)
        self.model = wrap(self.net) if wrap else self.net
        self.device = next(self.model.parameters()).device
        self.ema.to(self.device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg))
        self.path = StraightPath.from_config(cfg)

    def step(self, x1: torch.Tensor, g: torch.Generator, y: torch.Tensor | None = None) -> float:
        sample = self.path.sample_for(x1, g)
        if y is not None:
            y = drop_labels(y, self.cfg.p_uncond, self.net.n_classes, g).to(self.device)
        loss = flow_matching_loss(self.model, sample, self.device, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        with torch.no_grad():
            for pe, pm in zip(self.ema.parameters(), self.net.parameters()):
                pe.lerp_(pm, 1 - self.cfg.ema_decay)
        return loss.item()

    @torch.no_grad()
    def heldout(self, z_hold: torch.Tensor, y_hold: torch.Tensor | None = None, repeats: int = 64,
                seed: int = 99) -> float:
        """The EMA net's flow-matching loss on held-out latents (and labels), with a fixed draw of noise and no
        OT pairing, so that checkpoints compare fairly."""
        self.ema.eval()
        g = torch.Generator().manual_seed(seed)
        sample = self.path.without_ot().sample_for(z_hold.cpu().repeat(repeats, 1), g)
        labels = None if y_hold is None else y_hold.repeat(repeats).to(self.device)
        loss = float(flow_matching_loss(self.ema, sample, self.device, labels))
        self.ema.train()
        return loss

    def state_dict(self) -> dict:
        return {"model": self.net.state_dict(), "ema": self.ema.state_dict(), "opt": self.opt.state_dict(),
                "sched": self.sched.state_dict()}

    def load_state_dict(self, saved: dict) -> None:
        self.net.load_state_dict(saved["model"])
        self.ema.load_state_dict(saved["ema"])
        self.opt.load_state_dict(saved["opt"])
        self.sched.load_state_dict(saved["sched"])


def selectable(cfg: FlowConfig, step: int) -> bool:
    """Whether the checkpoint after ``step`` steps may be chosen: early checkpoints of a flow that memorises
    its few latents can score a lower held-out loss by chance while undertrained (kept only for resuming)."""
    return step >= cfg.select_after * cfg.steps or step == cfg.steps


def selection_loss(cfg: FlowConfig, step: int, heldout: float) -> float:
    """What the checkpoint after ``step`` steps is chosen by: its held-out loss once ``selectable``, else inf."""
    return heldout if selectable(cfg, step) else float("inf")


class CheckpointChoice:
    """Which checkpoint a flow run keeps, in one place for the Ray Train run and ``train_in_process``: the lowest
    ``selection_loss`` offered, the earliest of equals."""

    def __init__(self):
        self.metrics: dict | None = None

    def offer(self, metrics: dict) -> bool:
        """Whether the checkpoint with ``metrics`` (its ``step`` and ``selection_loss``) is the best so far; it is
        then the one chosen."""
        if self.metrics is None or metrics["selection_loss"] < self.metrics["selection_loss"]:
            self.metrics = metrics
            return True
        return False


def is_eval_step(cfg: FlowConfig, step: int) -> bool:
    """Whether the held-out loss is measured (and a checkpoint written) after ``step`` steps."""
    return step % cfg.eval_every == 0 or step == cfg.steps


def noise_generator(seed: int, rank: int = 0, start_step: int = 0) -> torch.Generator:
    """Each worker draws its own noise; a resumed run continues with a fresh, reproducible stream."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + rank) * 1_000_003 + start_step) % 2**63)


def holdout_indices(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) row indices: a fraction (at least one) held out for checkpoint selection;
    both are every row when there are too few to hold any out."""
    n_hold = int(round(n * fraction))
    if fraction <= 0 or n_hold < 1 or n - n_hold < 2:
        return np.arange(n), np.arange(n)
    perm = np.random.default_rng(seed).permutation(n)
    return perm[n_hold:], perm[:n_hold]


def check_labels(labels, n: int) -> np.ndarray:
    y = np.asarray(labels)
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
        raise ValueError(f"labels must be {n} non-negative integers (one per latent), got shape {y.shape} "
                         f"and dtype {y.dtype}")
    return y


def train_in_process(z: np.ndarray, cfg: FlowConfig, labels=None,
                     on_eval: Callable[[int, float, FlowTrainer], None] | None = None) -> tuple[FlowTrainer, dict]:
    """The Ray Train run's training and checkpoint choice in one process, without checkpoints (benchmarks,
    tests): ``z`` are standardised latents. ``on_eval(step, heldout_loss, trainer)`` sees every selectable
    checkpoint (benchmarks that score them otherwise). Returns the trainer with the EMA weights of the best
    selectable held-out loss loaded into ``trainer.ema``, and (best_step, best_heldout_loss, seconds)."""
    t0 = time.perf_counter()
    train, hold = holdout_indices(len(z), cfg.holdout_fraction, cfg.seed)
    u = torch.as_tensor(np.asarray(z), dtype=torch.float32)
    y = None if labels is None else torch.as_tensor(check_labels(labels, len(z)), dtype=torch.long)
    trainer = FlowTrainer(cfg, u.shape[1], n_classes=0 if y is None else int(y.max()) + 1)
    g = noise_generator(cfg.seed)
    train = torch.as_tensor(train)
    choice, best_state = CheckpointChoice(), None
    for step in range(cfg.steps):
        idx = train[torch.randint(len(train), (cfg.batch_size,), generator=g)]
        trainer.step(u[idx], g, None if y is None else y[idx])
        if is_eval_step(cfg, step + 1) and selectable(cfg, step + 1):
            loss = trainer.heldout(u[hold], None if y is None else y[hold])
            if on_eval is not None:
                on_eval(step + 1, loss, trainer)
            if loss < math.inf and choice.offer({"step": step + 1, "selection_loss": loss}):   # never NaN
                best_state = {k: v.clone() for k, v in trainer.ema.state_dict().items()}
    if best_state is None:
        raise ValueError("the held-out flow-matching loss was never finite: training diverged")
    trainer.ema.load_state_dict(best_state)
    best = {"best_step": choice.metrics["step"], "best_heldout_loss": choice.metrics["selection_loss"]}
    return trainer, {**best, "seconds": time.perf_counter() - t0}
