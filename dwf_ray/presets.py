"""Named presets: a RunConfig per use case (`dwf presets` lists them)."""
from __future__ import annotations

from dwf_ray.config import RunConfig, ZooConfig


def _digits_mlp() -> RunConfig:
    return RunConfig(preset="digits-mlp")


def _iris_mlp() -> RunConfig:
    cfg = RunConfig(preset="iris-mlp")
    cfg.zoo = ZooConfig(dataset="iris", epochs=150, batch_size=16,
                        arch={"family": "mlp", "args": {"in_dim": 4, "hidden": [16, 16], "out_dim": 3}})
    return cfg


def _smoke() -> RunConfig:
    """A few models and steps: the end-to-end test preset."""
    cfg = RunConfig(preset="smoke")
    cfg.zoo.n_models, cfg.zoo.epochs = 12, 15
    cfg.flow.steps, cfg.flow.eval_every, cfg.flow.hidden, cfg.flow.warmup_steps = 60, 30, 64, 10
    cfg.flow.num_workers = 2         # exercises DDP
    cfg.sample.n, cfg.sample.steps = 8, 20
    cfg.eval.temperatures, cfg.eval.n_baseline = [0.5, 1.0], 12
    cfg.eval.noise_levels, cfg.eval.mix_weights = [0.25, 1.0], [0.1, 0.5]
    return cfg


PRESETS = {"digits-mlp": _digits_mlp, "iris-mlp": _iris_mlp, "smoke": _smoke}


def preset(name: str) -> RunConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
    return PRESETS[name]()
