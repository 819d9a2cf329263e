"""Stage 5: sample latents with an ODE solver and decode them to checkpoints."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from dwf_ray import store
from dwf_ray.archs import ArchSpec
from dwf_ray.flow.solvers import integrate
from dwf_ray.flow.train import LatentScaler
from dwf_ray.pca.shards import PCAModel
from dwf_ray.weights import WeightLayout, save_checkpoint


@torch.no_grad()
def sample_latents(net: torch.nn.Module, scaler: LatentScaler, n: int, source_std: float = 1.0,
                   temperature: float = 1.0, solver: str = "rk4", steps: int = 100, seed: int = 0) -> np.ndarray:
    """n latents (PCA coordinates): fresh source noise from ``seed``, scaled by ``temperature``."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, len(scaler.mean), generator=g) * source_std * temperature
    net.eval()
    u = integrate(lambda t, x: net(x, t), x0, solver, steps)
    return scaler.inverse(u.numpy())


def write_samples(flat: np.ndarray, layout: WeightLayout, arch: ArchSpec, out_dir: str,
                  prefix: str = "g") -> pd.DataFrame:
    rows = []
    for i, vec in enumerate(flat):
        model_id = f"{prefix}{i:05d}"
        uri = store.join(out_dir, f"{model_id}.safetensors")
        sha = save_checkpoint(uri, layout.unflatten(vec), arch)
        rows.append({"model_id": model_id, "uri": uri, "arch": arch.to_json(), "sha256": sha,
                     "n_params": layout.size, "status": "ok", "error": ""})
    return pd.DataFrame(rows)


def generate(flow_uri: str, pca_dir: str, n: int, temperature: float, solver: str, steps: int,
             seed: int) -> np.ndarray:
    """Sample ``n`` flat weight vectors (canonical space)."""
    from dwf_ray.flow.train import load_flow
    net, scaler, cfg = load_flow(flow_uri)
    z = sample_latents(net, scaler, n, cfg.source_std, temperature, solver, steps, seed)
    return PCAModel.load(pca_dir).decode(z)
