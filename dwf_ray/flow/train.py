"""Flow-matching training of the velocity network on latents with Ray Train (DDP); the flow stage is
``flow/stage.py``."""
from __future__ import annotations

import os
import tempfile

import numpy as np
import torch

from dwf_ray import store
from dwf_ray.config import FlowConfig
from dwf_ray.flow.checkpoint import LatentScaler, save_flow
from dwf_ray.flow.trainer import (CheckpointChoice, FlowTrainer, check_labels, holdout_indices, is_eval_step,
                                  noise_generator, selection_loss)


def _labels(values) -> torch.Tensor | None:
    return None if values is None else torch.as_tensor(np.asarray(values), dtype=torch.long)


def train_loop(config: dict) -> None:
    """Ray Train worker loop (DDP): fresh noise every step, EMA, held-out loss, checkpoints, resume.

    A checkpoint holds rank 0's random streams (noise and dropout) too: a one-worker run resumed from it goes on
    exactly as the undisturbed run would have; other ranks start fresh, reproducible streams.

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
            saved = torch.load(os.path.join(d, "flow.pt"), map_location=trainer.device, weights_only=True)
        trainer.load_state_dict(saved)
        start, history, resumed_at = saved["step"], saved["history"], saved.get("resumed_at", []) + [saved["step"]]
        if rank == 0:
            print(f"flow: resuming from the checkpoint of step {start}", flush=True)
    g = noise_generator(cfg.seed, rank, start)
    if ckpt and rank == 0 and "rng" in saved:   # rank 0 goes on with the noise and dropout streams it had
        g.set_state(saved["rng"]["noise"])
        torch.set_rng_state(saved["rng"]["torch"])
    progress = config.get("progress") if rank == 0 else None    # a runtime.progress.Counter the driver shows
    running = 0.0
    for step in range(start, cfg.steps):
        idx = torch.randint(len(z_train), (local_batch,), generator=g)
        running += trainer.step(z_train[idx], g, None if y_train is None else y_train[idx])
        if progress is not None and (step + 1) % max(1, cfg.steps // 100) == 0:
            progress.set.remote(step + 1)
        if is_eval_step(cfg, step + 1):
            n_since = step + 1 - (history[-1]["step"] if history else start)
            metrics = {"step": step + 1, "train_loss": running / n_since,
                       "heldout_loss": trainer.heldout(z_hold, y_hold)}
            metrics["selection_loss"] = selection_loss(cfg, step + 1, metrics["heldout_loss"])
            running = 0.0
            history.append(metrics)
            if rank == 0:
                print(f"flow: step {step + 1}/{cfg.steps} train loss {metrics['train_loss']:.4f} "
                      f"held-out loss {metrics['heldout_loss']:.4f}", flush=True)
            with tempfile.TemporaryDirectory() as d:
                checkpoint = None
                if rank == 0:
                    rng = {"noise": g.get_state(), "torch": torch.get_rng_state()}
                    torch.save({**trainer.state_dict(), "step": step + 1, "history": history,
                                "resumed_at": resumed_at, "rng": rng}, os.path.join(d, "flow.pt"))
                    checkpoint = ray.train.Checkpoint.from_directory(d)
                ray.train.report(metrics, checkpoint=checkpoint)


def train_flow(z: np.ndarray, cfg: FlowConfig, out_dir: str, run_name: str = "flow", labels=None,
               loop=train_loop, progress=None) -> dict:
    """Train on Ray Train; the checkpoint with the lowest held-out loss is written to ``out_dir/model.pt``.

    ``labels`` (one integer class per latent) train a conditional flow. ``loop`` is the worker function
    (``train_loop``; tests wrap it to inject failures). ``progress``: a ``runtime.progress.Counter`` that rank 0
    sets to the steps done.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    scaler = LatentScaler.fit(z, cfg.scaling)
    u = scaler.transform(z).astype(np.float32)
    train, hold = holdout_indices(len(u), cfg.holdout_fraction, cfg.seed)
    loop_config = {"flow": cfg.model_dump(), "z_train": u[train], "z_hold": u[hold], "progress": progress}
    n_classes = 0
    if labels is not None:
        y = check_labels(labels, len(u))
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
    choice, best_ckpt = CheckpointChoice(), None
    for ckpt, metrics in result.best_checkpoints:
        if choice.offer(metrics):
            best_ckpt = ckpt
    best_metrics = choice.metrics
    with best_ckpt.as_directory() as d:
        saved = torch.load(os.path.join(d, "flow.pt"), map_location="cpu", weights_only=True)
    with result.checkpoint.as_directory() as d:
        last = torch.load(os.path.join(d, "flow.pt"), map_location="cpu", weights_only=True)
    held_out = not np.array_equal(train, hold)
    info = {"best_step": int(best_metrics["step"]), "best_heldout_loss": float(best_metrics["heldout_loss"]),
            "history": last["history"], "resumed_at": last["resumed_at"], "n_train": len(train),
            "n_holdout": len(hold) if held_out else 0, "n_classes": n_classes}
    save_flow(store.join(out_dir, "model.pt"), saved["ema"], cfg, scaler, z.shape[1], info, n_classes)
    return info
