"""Stage 4: flow-matching training of the velocity network on PCA latents with Ray Train."""
from __future__ import annotations

import copy
import io
import math
import os
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from dwf_ray import store
from dwf_ray.config import FlowConfig
from dwf_ray.flow.model import VelocityMLP


def _float32(v) -> np.ndarray:
    return (v.numpy() if torch.is_tensor(v) else np.asarray(v)).astype(np.float32)


class LatentScaler:
    """Standardisation of the latents, stored with the flow checkpoint.

    whiten: per-dimension mean and std; global: one std for all dimensions; none: identity.
    """

    def __init__(self, mean, scale):
        self.mean, self.scale = _float32(mean), _float32(scale)

    @classmethod
    def fit(cls, z: np.ndarray, mode: str) -> "LatentScaler":
        mean = z.mean(0)
        if mode == "whiten":
            scale = z.std(0) + 1e-8
        elif mode == "global":
            scale = np.full(z.shape[1], z.std() + 1e-8)
        elif mode == "none":
            mean, scale = np.zeros(z.shape[1]), np.ones(z.shape[1])
        else:
            raise ValueError(f"unknown latent scaling {mode!r}")
        return cls(mean, scale)

    def transform(self, z: np.ndarray) -> np.ndarray:
        return (z - self.mean) / self.scale

    def inverse(self, u: np.ndarray) -> np.ndarray:
        return u * self.scale + self.mean

    def state(self) -> dict:
        return {"mean": torch.from_numpy(self.mean), "scale": torch.from_numpy(self.scale)}


def build_velocity_net(cfg: FlowConfig, dim: int, n_classes: int = 0) -> VelocityMLP:
    return VelocityMLP(dim, cfg.hidden, cfg.depth, cfg.time_dim, cfg.dropout, n_classes)


def source_noise(kind: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Unit-variance source noise: standard normal, or uniform on [-sqrt 3, sqrt 3]."""
    if kind == "gaussian":
        return torch.randn(shape, generator=g)
    if kind == "uniform":
        return (torch.rand(shape, generator=g) * 2 - 1) * math.sqrt(3)
    raise ValueError(f"unknown source distribution {kind!r}; use 'gaussian' or 'uniform'")


def training_times(cfg: FlowConfig, n: int, g: torch.Generator) -> torch.Tensor:
    """Times t in (0, 1): uniform, or logit-normal (more weight in the middle of the path)."""
    if cfg.time_dist == "logit_normal":
        return torch.sigmoid(cfg.time_loc + cfg.time_scale * torch.randn(n, generator=g))
    return torch.rand(n, generator=g)


def ot_pair(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """Minibatch optimal-transport coupling: reorder the source samples to match targets."""
    cost = torch.cdist(x1, x0).pow(2).numpy()
    _, cols = linear_sum_assignment(cost)
    return x0[torch.as_tensor(cols)]


def flow_batch(x1: torch.Tensor, cfg: FlowConfig, g: torch.Generator):
    """(x_t, t, target velocity) with fresh source noise, times and path noise."""
    x0 = source_noise(cfg.source, x1.shape, g) * cfg.source_std
    if cfg.ot_coupling:
        x0 = ot_pair(x0, x1)
    t = training_times(cfg, len(x1), g)
    eps = torch.randn(x1.shape, generator=g)
    xt = (1 - t[:, None]) * x0 + t[:, None] * x1 + cfg.sigma * eps
    return xt, t, x1 - x0


@torch.no_grad()
def heldout_loss(net: torch.nn.Module, z: torch.Tensor, cfg: FlowConfig, y: torch.Tensor | None = None,
                 repeats: int = 64, seed: int = 99) -> float:
    """Flow-matching loss on held-out latents (and their labels) with a fixed draw of noise, so checkpoints
    compare fairly."""
    net.eval()
    g = torch.Generator().manual_seed(seed)
    x1 = z.cpu().repeat(repeats, 1)
    xt, t, v = flow_batch(x1, cfg.model_copy(update={"ot_coupling": False}), g)
    dev = next(net.parameters()).device
    labels = None if y is None else y.repeat(repeats).to(dev)
    loss = float(F.mse_loss(net(xt.to(dev), t.to(dev), labels), v.to(dev)))
    net.train()
    return loss


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

    def step(self, x1: torch.Tensor, g: torch.Generator, y: torch.Tensor | None = None) -> float:
        xt, t, v = flow_batch(x1, self.cfg, g)
        if y is not None:
            y = torch.where(torch.rand(len(y), generator=g) < self.cfg.p_uncond, self.net.n_classes, y).to(self.device)
        loss = F.mse_loss(self.model(xt.to(self.device), t.to(self.device), y), v.to(self.device))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        with torch.no_grad():
            for pe, pm in zip(self.ema.parameters(), self.net.parameters()):
                pe.lerp_(pm, 1 - self.cfg.ema_decay)
        return loss.item()

    def heldout(self, z_hold: torch.Tensor, y_hold: torch.Tensor | None = None) -> float:
        return heldout_loss(self.ema, z_hold.to(self.device), self.cfg, y_hold)

    def state_dict(self) -> dict:
        return {"model": self.net.state_dict(), "ema": self.ema.state_dict(), "opt": self.opt.state_dict(),
                "sched": self.sched.state_dict()}

    def load_state_dict(self, st: dict) -> None:
        self.net.load_state_dict(st["model"])
        self.ema.load_state_dict(st["ema"])
        self.opt.load_state_dict(st["opt"])
        self.sched.load_state_dict(st["sched"])


def selectable(cfg: FlowConfig, step: int) -> bool:
    """Whether the checkpoint after ``step`` steps may be chosen: early checkpoints of a flow that memorises
    its few latents can score a lower held-out loss by chance while undertrained (kept only for resuming)."""
    return step >= cfg.select_after * cfg.steps or step == cfg.steps


def is_eval_step(cfg: FlowConfig, step: int) -> bool:
    """Whether the held-out loss is measured (and a checkpoint written) after ``step`` steps."""
    return step % cfg.eval_every == 0 or step == cfg.steps


def noise_generator(seed: int, rank: int = 0, start_step: int = 0) -> torch.Generator:
    """Each worker draws its own noise; a resumed run continues with a fresh, reproducible stream."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + rank) * 1_000_003 + start_step) % 2**63)


def _labels(values) -> torch.Tensor | None:
    return None if values is None else torch.as_tensor(np.asarray(values), dtype=torch.long)


def train_loop(config: dict) -> None:
    """Ray Train worker loop (DDP): fresh noise every step, EMA, held-out loss, checkpoints, resume.

    ``config``: flow (FlowConfig dict), z_train, z_hold; for a conditional flow also y_train, y_hold, n_classes.
    """
    import ray.train
    import ray.train.torch

    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    cfg = FlowConfig.model_validate(config["flow"])
    z_train = torch.tensor(np.array(config["z_train"]), dtype=torch.float32)
    z_hold = torch.tensor(np.array(config["z_hold"]), dtype=torch.float32)
    y_train, y_hold = _labels(config.get("y_train")), _labels(config.get("y_hold"))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    trainer = FlowTrainer(cfg, z_train.shape[1], wrap=ray.train.torch.prepare_model,
                          n_classes=int(config.get("n_classes", 0)))
    local_batch = max(1, cfg.batch_size // world)
    start, history, resumed_at = 0, [], []
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            st = torch.load(os.path.join(d, "flow.pt"), map_location=trainer.device, weights_only=True)
        trainer.load_state_dict(st)
        start, history, resumed_at = st["step"], st["history"], st.get("resumed_at", []) + [st["step"]]
        if rank == 0:
            print(f"flow: resuming from the checkpoint of step {start}", flush=True)
    g = noise_generator(cfg.seed, rank, start)
    running = 0.0
    for step in range(start, cfg.steps):
        idx = torch.randint(len(z_train), (local_batch,), generator=g)
        running += trainer.step(z_train[idx], g, None if y_train is None else y_train[idx])
        if is_eval_step(cfg, step + 1):
            n_since = step + 1 - (history[-1]["step"] if history else start)
            metrics = {"step": step + 1, "train_loss": running / n_since,
                       "heldout_loss": trainer.heldout(z_hold, y_hold)}
            metrics["selection_loss"] = metrics["heldout_loss"] if selectable(cfg, step + 1) else float("inf")
            running = 0.0
            history.append(metrics)
            if rank == 0:
                print(f"flow: step {step + 1}/{cfg.steps} train loss {metrics['train_loss']:.4f} "
                      f"held-out loss {metrics['heldout_loss']:.4f}", flush=True)
            with tempfile.TemporaryDirectory() as d:
                checkpoint = None
                if rank == 0:
                    torch.save({**trainer.state_dict(), "step": step + 1, "history": history,
                                "resumed_at": resumed_at}, os.path.join(d, "flow.pt"))
                    checkpoint = ray.train.Checkpoint.from_directory(d)
                ray.train.report(metrics, checkpoint=checkpoint)


def holdout_indices(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) row indices: a fraction (at least one) held out for checkpoint selection;
    both are every row when there are too few to hold any out."""
    n_hold = int(round(n * fraction))
    if fraction <= 0 or n_hold < 1 or n - n_hold < 2:
        return np.arange(n), np.arange(n)
    perm = np.random.default_rng(seed).permutation(n)
    return perm[n_hold:], perm[:n_hold]


def split_holdout(z: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out a fraction of the latents (at least one) for checkpoint selection."""
    train, hold = holdout_indices(len(z), fraction, seed)
    return z[train], z[hold]


def _check_labels(labels, n: int) -> np.ndarray:
    y = np.asarray(labels)
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
        raise ValueError(f"labels must be {n} non-negative integers (one per latent), got shape {y.shape} "
                         f"and dtype {y.dtype}")
    return y


def train_in_process(z: np.ndarray, cfg: FlowConfig, labels=None) -> tuple[FlowTrainer, dict]:
    """The Ray Train run's training and checkpoint choice in one process, without checkpoints (benchmarks,
    tests): ``z`` are standardised latents. Returns the trainer with the EMA weights of the best selectable
    held-out loss loaded into ``trainer.ema``, and (best_step, best_heldout_loss, seconds)."""
    t0 = time.perf_counter()
    train, hold = holdout_indices(len(z), cfg.holdout_fraction, cfg.seed)
    u = torch.as_tensor(np.asarray(z), dtype=torch.float32)
    y = None if labels is None else torch.as_tensor(_check_labels(labels, len(z)), dtype=torch.long)
    trainer = FlowTrainer(cfg, u.shape[1], n_classes=0 if y is None else int(y.max()) + 1)
    g = noise_generator(cfg.seed)
    train = torch.as_tensor(train)
    best = {"best_step": None, "best_heldout_loss": float("inf")}
    best_state = None
    for step in range(cfg.steps):
        idx = train[torch.randint(len(train), (cfg.batch_size,), generator=g)]
        trainer.step(u[idx], g, None if y is None else y[idx])
        if is_eval_step(cfg, step + 1) and selectable(cfg, step + 1):
            loss = trainer.heldout(u[hold], None if y is None else y[hold])
            if loss < best["best_heldout_loss"]:
                best = {"best_step": step + 1, "best_heldout_loss": loss}
                best_state = {k: v.clone() for k, v in trainer.ema.state_dict().items()}
    if best_state is None:
        raise ValueError("the held-out flow-matching loss was never finite: training diverged")
    trainer.ema.load_state_dict(best_state)
    return trainer, {**best, "seconds": time.perf_counter() - t0}


def run_flow(z: np.ndarray, cfg: FlowConfig, out_dir: str, run_name: str = "flow", labels=None,
             loop=train_loop) -> dict:
    """Train on Ray Train; the checkpoint with the lowest held-out loss is written to ``out_dir/model.pt``.

    ``labels`` (one integer class per latent) train a conditional flow. ``loop`` is the worker function
    (``train_loop``; tests wrap it to inject failures).
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    scaler = LatentScaler.fit(z, cfg.scaling)
    u = scaler.transform(z).astype(np.float32)
    train, hold = holdout_indices(len(u), cfg.holdout_fraction, cfg.seed)
    loop_config = {"flow": cfg.model_dump(), "z_train": u[train], "z_hold": u[hold]}
    n_classes = 0
    if labels is not None:
        y = _check_labels(labels, len(u))
        n_classes = int(y.max()) + 1
        loop_config.update({"y_train": y[train], "y_hold": y[hold], "n_classes": n_classes})
    storage_path, storage_fs = store.pyarrow_storage(store.join(out_dir, "ray_train"))
    use_gpu = cfg.resolved_use_gpu()
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu,
                                               resources_per_worker=None if use_gpu else {"CPU": 1}),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=storage_path, storage_filesystem=storage_fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="selection_loss",
                                                         checkpoint_score_order="min"),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures)),
    )
    result = trainer.fit()
    best_ckpt, best_metrics = min(result.best_checkpoints, key=lambda cm: cm[1]["selection_loss"])
    with best_ckpt.as_directory() as d:
        st = torch.load(os.path.join(d, "flow.pt"), map_location="cpu", weights_only=True)
    with result.checkpoint.as_directory() as d:
        last = torch.load(os.path.join(d, "flow.pt"), map_location="cpu", weights_only=True)
    held_out = not np.array_equal(train, hold)
    info = {"best_step": int(best_metrics["step"]), "best_heldout_loss": float(best_metrics["heldout_loss"]),
            "history": last["history"], "resumed_at": last["resumed_at"], "n_train": len(train),
            "n_holdout": len(hold) if held_out else 0, "n_classes": n_classes}
    save_flow(store.join(out_dir, "model.pt"), st["ema"], cfg, scaler, z.shape[1], info, n_classes)
    return info


def save_flow(uri: str, ema_state: dict, cfg: FlowConfig, scaler: LatentScaler, dim: int, info: dict,
              n_classes: int = 0) -> None:
    buf = io.BytesIO()
    torch.save({"ema": ema_state, "config": cfg.model_dump(), "scaler": scaler.state(), "dim": dim,
                "n_classes": n_classes, "info": info}, buf)
    store.write_bytes(uri, buf.getvalue())


def load_flow(uri: str) -> tuple[VelocityMLP, LatentScaler, FlowConfig]:
    st = torch.load(io.BytesIO(store.read_bytes(uri)), map_location="cpu", weights_only=True)
    cfg = FlowConfig.model_validate(st["config"])
    net = build_velocity_net(cfg, st["dim"], st.get("n_classes", 0))
    net.load_state_dict(st["ema"])
    return net.eval(), LatentScaler(**st["scaler"]), cfg
