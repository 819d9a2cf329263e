"""The sampling service as a Ray Serve application over one finished run root: ``make_app`` (Python) and
``build_app`` (a Serve config file's ``import_path: dwf_ray.serve.app:build_app``)."""
from typing import Optional

from dwf_ray import store
from dwf_ray.serve.auth import read_token, token_digest
from dwf_ray.serve.config import AppArgs, ServeConfig
from dwf_ray.serve.deployment import SampleService

APP_NAME = "dwf"


def make_app(root: str, cfg: Optional[ServeConfig] = None, token: Optional[str] = None):
    """The Serve application over ``root`` (checked to hold a trained flow) with ``cfg``'s deployment options."""
    from dwf_ray.store import RunStore
    cfg = cfg or ServeConfig()
    root = RunStore(root).root
    if not store.exists(store.join(root, "flow", "model.pt")):
        raise FileNotFoundError(f"{root}: no flow/model.pt; serve a run root whose flow stage is complete")
    return SampleService.options(**cfg.deployment_options()).bind(root, cfg.model_dump_json(), token_digest(token))


def build_app(args: dict):
    """Application builder for a Serve config file (``import_path: dwf_ray.serve.app:build_app``).

    ``args``: ``root`` (required), ``token_file`` (else $DWF_SERVE_TOKEN where the app is built), and any
    ServeConfig field (num_replicas or autoscaling_config, max_ongoing_requests, max_queued_requests,
    max_batch_size, batch_wait_timeout_s, num_cpus, num_gpus, ...). Unknown keys are an error.
    """
    parsed = AppArgs.model_validate(args)
    return make_app(parsed.root, parsed.serve_config(), read_token(parsed.token_file))
