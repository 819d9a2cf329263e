"""The Generator: a finished run's flow, latent scaler(s) and PCA decoder(s), loaded once, turned into new
flat weights on demand. The sample stage, evaluation, conditional runs, the benches and the Serve app use it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import pandas as pd
import torch

from dwf_ray import store
from dwf_ray.archs import ArchSpec
from dwf_ray.config import FlowConfig, RunConfig
from dwf_ray.flow.checkpoint import LatentScaler, load_flow
from dwf_ray.flow.guidance import guided_velocity
from dwf_ray.flow.path import StraightPath
from dwf_ray.flow.solvers import integrate
from dwf_ray.pca.model import PCAModel
from dwf_ray.store import RunStore
from dwf_ray.weights import WeightLayout, save_checkpoint


class RequestError(ValueError):
    """A sampling request the Generator cannot answer; ``field`` names the argument at fault."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass
class Decoder:
    """Standardised latents -> flat weights of one zoo: its latent scaler, PCA and architecture."""
    scaler: LatentScaler
    pca: PCAModel
    arch: ArchSpec

    def __call__(self, u: np.ndarray) -> np.ndarray:
        z = self.scaler.inverse(u)
        if z.shape[1] < self.pca.k:     # a conditional flow keeps the smallest k of its zoos
            z = np.pad(z, ((0, 0), (0, self.pca.k - z.shape[1])))
        return self.pca.decode(z)


def write_models(states: Iterable[dict[str, np.ndarray]], arch: ArchSpec, out_dir: str, prefix: str = "g",
                 extra: dict[str, str] | None = None) -> pd.DataFrame:
    """Each state dict as a safetensors checkpoint ``<prefix><i>.safetensors`` under ``out_dir`` (``extra`` in
    every file's metadata); returns their manifest."""
    rows = []
    for i, state in enumerate(states):
        model_id = f"{prefix}{i:05d}"
        uri = store.join(out_dir, f"{model_id}.safetensors")
        sha = save_checkpoint(uri, state, arch, extra)
        rows.append({"model_id": model_id, "uri": uri, "arch": arch.to_json(), "sha256": sha,
                     "n_params": int(sum(v.size for v in state.values())), "status": "ok", "error": ""})
    return pd.DataFrame(rows)


def write_samples(flat: np.ndarray, arch: ArchSpec, out_dir: str, prefix: str = "g") -> pd.DataFrame:
    """Each flat vector as a safetensors checkpoint under ``out_dir``; returns their manifest."""
    layout = WeightLayout.from_arch(arch)
    return write_models((layout.unflatten(v) for v in flat), arch, out_dir, prefix)


class Generator:
    """``gen(n, temperature, seed, solver, steps, label, guidance)`` -> (n, d) flat weights (canonical space).

    The source noise of a call comes from its own ``seed`` (never a fixed set of vectors), so calls can be
    solved together (``source`` then ``solve``) without changing any one of them.
    """

    def __init__(self, net: torch.nn.Module, flow_cfg: FlowConfig, decoders: list[Decoder],
                 class_names: list[str] | None = None, device: str = "cpu"):
        self.net, self.flow_cfg, self.decoders = net.to(device).eval(), flow_cfg, decoders
        self.class_names, self.device = class_names, device
        self.dim = net.dim

    @classmethod
    def load(cls, root: str, device: str = "cpu") -> "Generator":
        """From a run root whose flow stage is complete (local or S3); a conditional run's root too."""
        classes_uri = store.join(root, "flow", "classes.json")
        net, scaler, fc = load_flow(store.join(root, "flow", "model.pt"))
        if store.exists(classes_uri):
            spec = store.read_json(classes_uri)["classes"]
            decoders = [Decoder(LatentScaler(c["mean"], c["scale"]), PCAModel.load(store.join(c["root"], "pca")),
                                _run_arch(c["root"])) for c in spec]
            return cls(net, fc, decoders, [c["name"] for c in spec], device)
        return cls(net, fc, [Decoder(scaler, PCAModel.load(store.join(root, "pca")), _run_arch(root))],
                   device=device)

    @property
    def conditional(self) -> bool:
        return self.class_names is not None

    def check_request(self, label: int | None, guidance: float = 1.0) -> None:
        """A label and guidance scale this flow can sample with; a RequestError naming the field otherwise."""
        if not self.conditional:
            if label is not None:
                raise RequestError("label", f"label: {label} given, but this flow is unconditional; leave label out")
            if guidance != 1.0:
                raise RequestError("guidance", "guidance: needs a conditional flow (and a label)")
            return
        k = len(self.decoders)
        if label is None or not 0 <= label < k:
            got = "none given" if label is None else f"got {label}"
            raise RequestError("label", f"label: this conditional flow needs a label in 0..{k - 1} "
                                        f"({', '.join(self.class_names)}); {got}")

    def decoder(self, label: int | None) -> Decoder:
        self.check_request(label)
        return self.decoders[0 if label is None else label]

    def source(self, n: int, seed: int, temperature: float = 1.0) -> torch.Tensor:
        """(n, dim) source noise of one call: the flow's source distribution, scaled by ``temperature``."""
        g = torch.Generator().manual_seed(seed)
        return StraightPath.from_config(self.flow_cfg).source((n, self.dim), g) * temperature

    @torch.no_grad()
    def solve(self, x0: torch.Tensor, solver: str = "rk4", steps: int = 100, label: int | None = None,
              guidance: float = 1.0) -> np.ndarray:
        """Standardised latents at t = 1 of the flow started at ``x0``."""
        self.decoder(label)
        u = integrate(guided_velocity(self.net, label, guidance), x0.to(self.device), solver, steps)
        return u.cpu().numpy()

    def decode(self, u: np.ndarray, label: int | None = None) -> np.ndarray:
        return self.decoder(label)(u)

    def latents(self, n: int, temperature: float = 1.0, seed: int = 0, solver: str = "rk4", steps: int = 100,
                label: int | None = None, guidance: float = 1.0) -> np.ndarray:
        """(n, k) PCA latents (the scaler undone) of new models."""
        u = self.solve(self.source(n, seed, temperature), solver, steps, label, guidance)
        return self.decoder(label).scaler.inverse(u)

    def __call__(self, n: int, temperature: float = 1.0, seed: int = 0, solver: str = "rk4", steps: int = 100,
                 label: int | None = None, guidance: float = 1.0) -> np.ndarray:
        u = self.solve(self.source(n, seed, temperature), solver, steps, label, guidance)
        return self.decode(u, label)

    def arch(self, label: int | None = None) -> ArchSpec:
        return self.decoder(label).arch

    def state_dicts(self, flat: np.ndarray, label: int | None = None) -> list[dict[str, np.ndarray]]:
        layout = WeightLayout.from_arch(self.arch(label))
        return [layout.unflatten(v) for v in flat]

    def write(self, out_dir: str, flat: np.ndarray, label: int | None = None) -> pd.DataFrame:
        """Checkpoints of ``flat`` under ``out_dir`` and their manifest (manifest.parquet too)."""
        manifest = write_samples(flat, self.arch(label), out_dir)
        store.write_table(store.join(out_dir, "manifest.parquet"), manifest)
        return manifest


def _run_arch(root: str) -> ArchSpec:
    cfg = RunStore(root).saved_config(RunConfig)
    if cfg is None:
        raise FileNotFoundError(f"{root}: no config.json; not a dwf run root")
    return ArchSpec.parse(cfg.zoo.arch)
