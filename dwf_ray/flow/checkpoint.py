"""The flow's checkpoint (model.pt): EMA velocity weights, their config, and the latent scaler."""
from __future__ import annotations

import io

import numpy as np
import torch

from dwf_ray import store
from dwf_ray.config import FlowConfig
from dwf_ray.flow.model import VelocityMLP, build_velocity_net
from dwf_ray.weights import torch_load_data


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


def save_flow(uri: str, ema_state: dict, cfg: FlowConfig, scaler: LatentScaler, dim: int, info: dict,
              n_classes: int = 0) -> None:
    buf = io.BytesIO()
    torch.save({"ema": ema_state, "config": cfg.model_dump(), "scaler": scaler.state(), "dim": dim,
                "n_classes": n_classes, "info": info}, buf)
    store.write_bytes(uri, buf.getvalue())


def load_flow(uri: str) -> tuple[VelocityMLP, LatentScaler, FlowConfig]:
    """(velocity net in eval mode, latent scaler, flow config) of a flow checkpoint, local or S3."""
    try:
        raw = store.read_bytes(uri)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{uri}: no flow checkpoint; run the flow stage first") from exc
    saved = torch_load_data(raw, uri)
    cfg = FlowConfig.model_validate(saved["config"])
    net = build_velocity_net(cfg, saved["dim"], saved.get("n_classes", 0))
    net.load_state_dict(saved["ema"])
    return net.eval(), LatentScaler(**saved["scaler"]), cfg
