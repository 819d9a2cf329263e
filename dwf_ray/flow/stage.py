"""The flow stage: flow matching on the run's PCA latents with Ray Train, into flow/model.pt."""
from __future__ import annotations

from dwf_ray.config import RunConfig
from dwf_ray.flow.train import train_flow
from dwf_ray.pca.model import PCAModel
from dwf_ray.runtime.progress import run_with_progress
from dwf_ray.store import RunStore


def run_flow(cfg: RunConfig, run_store: RunStore) -> dict:
    """The flow stage: train on the run's PCA latents; writes flow/model.pt."""
    z = PCAModel.load_latents(run_store.uri("pca"))
    info = run_with_progress(lambda counter: train_flow(z, cfg.flow, run_store.uri("flow"), progress=counter),
                             cfg.flow.steps, "flow")
    return {k: v for k, v in info.items() if k != "history"}
