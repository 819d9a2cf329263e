"""Stage 5: sample latents with an ODE solver and decode them to checkpoints."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from dwf_ray import store
from dwf_ray.archs import ArchSpec
from dwf_ray.flow.solvers import integrate
from dwf_ray.flow.train import LatentScaler, source_noise
from dwf_ray.pca.shards import PCAModel
from dwf_ray.weights import WeightLayout, save_checkpoint


def guided_velocity(net: torch.nn.Module, label: int | None, guidance: float):
    """f(t, x) for the ODE solver. With a label (conditional flow): v_uncond + w (v_cond - v_uncond);
    w = 1 is the plain conditional flow, w = 0 the unconditional one."""
    if label is None:
        return lambda t, x: net(x, t)
    if not 0 <= label < getattr(net, "n_classes", 0):
        raise ValueError(f"label {label} is out of range for a flow with {getattr(net, 'n_classes', 0)} classes")

    def f(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        n = len(x)
        y = torch.full((n,), label, dtype=torch.long, device=x.device)
        if guidance == 1.0:
            return net(x, t, y)
        null = torch.full((n,), net.n_classes, dtype=torch.long, device=x.device)
        v = net(torch.cat([x, x]), t.expand(2 * n) if t.dim() == 0 else torch.cat([t, t]), torch.cat([y, null]))
        v_cond, v_uncond = v[:n], v[n:]
        return v_uncond + guidance * (v_cond - v_uncond)
    return f


@torch.no_grad()
def sample_latents(net: torch.nn.Module, scaler: LatentScaler, n: int, source_std: float = 1.0,
                   temperature: float = 1.0, solver: str = "rk4", steps: int = 100, seed: int = 0,
                   source: str = "gaussian", label: int | None = None, guidance: float = 1.0) -> np.ndarray:
    """n latents (PCA coordinates): fresh source noise from ``seed``, scaled by ``temperature``.

    ``label`` (conditional flows) picks the class, ``guidance`` the classifier-free guidance scale w.
    """
    g = torch.Generator().manual_seed(seed)
    x0 = source_noise(source, (n, len(scaler.mean)), g) * source_std * temperature
    net.eval()
    u = integrate(guided_velocity(net, label, guidance), x0, solver, steps)
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
    z = sample_latents(net, scaler, n, cfg.source_std, temperature, solver, steps, seed, cfg.source)
    return PCAModel.load(pca_dir).decode(z)
