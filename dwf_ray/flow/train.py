"""Stage 4: flow-matching training of the velocity network on PCA latents with Ray Train."""
from __future__ import annotations

import copy
import io
import math
import os
import tempfile

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


def build_velocity_net(cfg: FlowConfig, dim: int) -> VelocityMLP:
    return VelocityMLP(dim, cfg.hidden, cfg.depth, cfg.time_dim, cfg.dropout)


def ot_pair(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """Minibatch optimal-transport coupling: reorder the source samples to match targets."""
    cost = torch.cdist(x1, x0).pow(2).numpy()
    _, cols = linear_sum_assignment(cost)
    return x0[torch.as_tensor(cols)]


def flow_batch(x1: torch.Tensor, cfg: FlowConfig, g: torch.Generator):
    """(x_t, t, target velocity) with fresh source noise, times and path noise."""
    x0 = torch.randn(x1.shape, generator=g) * cfg.source_std
    if cfg.ot_coupling:
        x0 = ot_pair(x0, x1)
    t = torch.rand(len(x1), generator=g)
    eps = torch.randn(x1.shape, generator=g)
    xt = (1 - t[:, None]) * x0 + t[:, None] * x1 + cfg.sigma * eps
    return xt, t, x1 - x0


@torch.no_grad()
def heldout_loss(net: torch.nn.Module, z: torch.Tensor, cfg: FlowConfig, repeats: int = 64, seed: int = 99) -> float:
    """Flow-matching loss on held-out latents with a fixed draw of noise, so checkpoints compare fairly."""
    net.eval()
    g = torch.Generator().manual_seed(seed)
    x1 = z.cpu().repeat(repeats, 1)
    xt, t, v = flow_batch(x1, cfg.model_copy(update={"ot_coupling": False}), g)
    dev = next(net.parameters()).device
    loss = float(F.mse_loss(net(xt.to(dev), t.to(dev)), v.to(dev)))
    net.train()
    return loss


def lr_lambda(cfg: FlowConfig):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


class FlowTrainer:
    """One flow-matching optimiser: velocity net, its EMA copy, AdamW with warmup + cosine.

    Shared by the Ray Train worker loop and by single-process sweeps (bench/flow_sweep.py).
    ``wrap`` prepares the net for distributed training (``ray.train.torch.prepare_model``: DDP).
    """

    def __init__(self, cfg: FlowConfig, dim: int, wrap=None):
        torch.manual_seed(cfg.seed)
        self.cfg = cfg
        self.net = build_velocity_net(cfg, dim)
        self.ema = copy.deepcopy(self.net)
        self.model = wrap(self.net) if wrap else self.net
        self.device = next(self.model.parameters()).device
        self.ema.to(self.device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg))

    def step(self, x1: torch.Tensor, g: torch.Generator) -> float:
        xt, t, v = flow_batch(x1, self.cfg, g)
        loss = F.mse_loss(self.model(xt.to(self.device), t.to(self.device)), v.to(self.device))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        with torch.no_grad():
            for pe, pm in zip(self.ema.parameters(), self.net.parameters()):
                pe.lerp_(pm, 1 - self.cfg.ema_decay)
        return loss.item()

    def heldout(self, z_hold: torch.Tensor) -> float:
        return heldout_loss(self.ema, z_hold.to(self.device), self.cfg)

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


def noise_generator(seed: int, rank: int = 0, start_step: int = 0) -> torch.Generator:
    """Each worker draws its own noise; a resumed run continues with a fresh, reproducible stream."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + rank) * 1_000_003 + start_step) % 2**63)


def train_loop(config: dict) -> None:
    """Ray Train worker loop (DDP): fresh noise every step, EMA, held-out loss, checkpoints, resume."""
    import ray.train
    import ray.train.torch

    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    cfg = FlowConfig.model_validate(config["flow"])
    z_train = torch.tensor(np.array(config["z_train"]), dtype=torch.float32)
    z_hold = torch.tensor(np.array(config["z_hold"]), dtype=torch.float32)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    trainer = FlowTrainer(cfg, z_train.shape[1], wrap=ray.train.torch.prepare_model)
    local_batch = max(1, cfg.batch_size // world)
    start, history = 0, []
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            st = torch.load(os.path.join(d, "flow.pt"), map_location=trainer.device, weights_only=True)
        trainer.load_state_dict(st)
        start, history = st["step"], st["history"]
    g = noise_generator(cfg.seed, rank, start)
    running = 0.0
    for step in range(start, cfg.steps):
        idx = torch.randint(len(z_train), (local_batch,), generator=g)
        running += trainer.step(z_train[idx], g)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            n_since = step + 1 - (history[-1]["step"] if history else start)
            metrics = {"step": step + 1, "train_loss": running / n_since, "heldout_loss": trainer.heldout(z_hold)}
            metrics["selection_loss"] = metrics["heldout_loss"] if selectable(cfg, step + 1) else float("inf")
            running = 0.0
            history.append(metrics)
            if rank == 0:
                print(f"flow: step {step + 1}/{cfg.steps} train loss {metrics['train_loss']:.4f} "
                      f"held-out loss {metrics['heldout_loss']:.4f}", flush=True)
            with tempfile.TemporaryDirectory() as d:
                checkpoint = None
                if rank == 0:
                    torch.save({**trainer.state_dict(), "step": step + 1, "history": history},
                               os.path.join(d, "flow.pt"))
                    checkpoint = ray.train.Checkpoint.from_directory(d)
                ray.train.report(metrics, checkpoint=checkpoint)


def split_holdout(z: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out a fraction of the latents (at least one) for checkpoint selection."""
    n_hold = int(round(len(z) * fraction))
    if fraction <= 0 or n_hold < 1 or len(z) - n_hold < 2:
        return z, z
    perm = np.random.default_rng(seed).permutation(len(z))
    return z[perm[n_hold:]], z[perm[:n_hold]]


def run_flow(z: np.ndarray, cfg: FlowConfig, out_dir: str, run_name: str = "flow") -> dict:
    """Train on Ray Train; the checkpoint with the lowest held-out loss is written to ``out_dir/model.pt``."""
    import ray.train
    from ray.train.torch import TorchTrainer

    scaler = LatentScaler.fit(z, cfg.scaling)
    u = scaler.transform(z).astype(np.float32)
    u_train, u_hold = split_holdout(u, cfg.holdout_fraction, cfg.seed)
    storage_path, storage_fs = store.pyarrow_storage(store.join(out_dir, "ray_train"))
    use_gpu = cfg.resolved_use_gpu()
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"flow": cfg.model_dump(), "z_train": u_train, "z_hold": u_hold},
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
    info = {"best_step": int(best_metrics["step"]), "best_heldout_loss": float(best_metrics["heldout_loss"]),
            "history": st["history"], "n_train": len(u_train), "n_holdout": len(u_hold) if u_hold is not u_train else 0}
    save_flow(store.join(out_dir, "model.pt"), st["ema"], cfg, scaler, z.shape[1], info)
    return info


def save_flow(uri: str, ema_state: dict, cfg: FlowConfig, scaler: LatentScaler, dim: int, info: dict) -> None:
    buf = io.BytesIO()
    torch.save({"ema": ema_state, "config": cfg.model_dump(), "scaler": scaler.state(), "dim": dim,
                "info": info}, buf)
    store.write_bytes(uri, buf.getvalue())


def load_flow(uri: str) -> tuple[VelocityMLP, LatentScaler, FlowConfig]:
    st = torch.load(io.BytesIO(store.read_bytes(uri)), map_location="cpu", weights_only=True)
    cfg = FlowConfig.model_validate(st["config"])
    net = build_velocity_net(cfg, st["dim"])
    net.load_state_dict(st["ema"])
    return net.eval(), LatentScaler(**st["scaler"]), cfg
