"""The Serve app's options (one typed config) and the arguments of its application builder."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dwf_ray.config import SOLVERS, parse_overrides, validation_message

MIB = 2 ** 20
GIB = 2 ** 30


class ServeConfig(BaseModel):
    """Deployment options of the sampling service; the defaults fit one 2-core machine.

    Each replica holds the flow, scaler and PCA decoder once. A request waits first in Ray Serve's queue
    (``max_queued_requests`` per caller, then 503 + Retry-After), then in the replica's batch queue
    (``max_ongoing_requests`` per replica), from which ``max_batch_size`` requests are solved together.
    """
    model_config = ConfigDict(extra="forbid")

    num_replicas: int = Field(1, ge=1)
    autoscaling_config: Optional[dict] = None      # Ray Serve AutoscalingConfig fields; replaces num_replicas
    max_ongoing_requests: int = Field(64, ge=1)    # per replica; at least max_batch_size or batches never fill
    max_queued_requests: int = Field(256, ge=1)    # per caller (each HTTP proxy); bounded: never -1
    retry_after_s: float = Field(1.0, ge=0)        # Retry-After of a 503 from the full queue
    router_max_backoff_s: float = Field(0.05, gt=0)    # a queued request retries a full replica at least this
                                                       # often (Serve's default, 0.5 s, leaves batches half empty)
    max_batch_size: int = Field(32, ge=1)          # requests merged into one ODE solve
    batch_wait_timeout_s: float = Field(0.01, ge=0)   # how long a batch waits to fill on an idle replica
    fill_while_busy: bool = True                   # while a batch is solved, the next fills for as long as the
    max_fill_wait_s: float = Field(2.0, ge=0)      # last solve took (at most this): full batches under load
    num_cpus: float = Field(0.5, gt=0)             # per replica
    num_gpus: float = Field(0.0, ge=0)             # per replica; > 0 solves and decodes on the GPU
    torch_threads: Optional[int] = Field(None, ge=1)   # None: the replica's CPUs, at least 1
    max_response_bytes: int = Field(256 * MIB, ge=1)   # sets the largest n of one request
    max_n: Optional[int] = Field(None, ge=1)       # a lower cap on n than max_response_bytes gives
    max_served_bytes: int = Field(10 * GIB, ge=0)  # format=uri output kept under <root>/served/ (all requests and
    max_served_models: int = Field(10_000, ge=0)   # replicas), in bytes and in checkpoints (each check lists them);
                                                   # past either, 507 quota_exceeded; 0 turns format=uri off
    default_solver: Optional[Literal[SOLVERS]] = None   # None: the run's sampler
    default_steps: Optional[int] = Field(None, ge=1)                                # (config.json "sample")
    max_steps: int = Field(1000, ge=1)
    max_temperature: float = Field(10.0, gt=0)
    max_abs_guidance: float = Field(20.0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> "ServeConfig":
        if self.default_steps is not None and self.default_steps > self.max_steps:
            raise ValueError(f"default_steps ({self.default_steps}) is above max_steps ({self.max_steps})")
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"max_ongoing_requests ({self.max_ongoing_requests}) must be at least max_batch_size "
                             f"({self.max_batch_size}): a replica never holds more requests than that, "
                             "so larger batches could never fill")
        if self.autoscaling_config is not None:
            if "num_replicas" in self.model_fields_set:
                raise ValueError("give num_replicas or autoscaling_config, not both")
            from ray.serve.config import AutoscalingConfig
            unknown = sorted(set(self.autoscaling_config) - set(AutoscalingConfig.model_fields))
            if unknown:   # Ray's own model drops unknown keys silently
                raise ValueError(f"autoscaling_config: unknown keys {unknown}; "
                                 f"known: {sorted(AutoscalingConfig.model_fields)}")
            try:
                AutoscalingConfig(**self.autoscaling_config)
            except (ValidationError, TypeError) as exc:
                raise ValueError(f"autoscaling_config: {exc}") from None
        return self

    def threads(self) -> int:
        return self.torch_threads or max(1, int(self.num_cpus))

    def deployment_options(self) -> dict:
        """Keyword arguments of ``Deployment.options`` for these settings."""
        opts = {"max_ongoing_requests": self.max_ongoing_requests, "max_queued_requests": self.max_queued_requests,
                "backpressure_config": {"status_code": 503, "retry_after_s": self.retry_after_s},
                "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
                "request_router_config": {"initial_backoff_s": min(0.01, self.router_max_backoff_s),
                                          "max_backoff_s": self.router_max_backoff_s}}
        if self.autoscaling_config is not None:
            return opts | {"autoscaling_config": dict(self.autoscaling_config)}
        return opts | {"num_replicas": self.num_replicas}

    def with_overrides(self, overrides: list[str]) -> "ServeConfig":
        """Apply ``key=value`` overrides (values parsed as JSON, else kept as strings); a bad key or value is a
        ValueError naming it."""
        values = parse_overrides(overrides)
        for key, value in values.items():
            if key not in type(self).model_fields:
                raise ValueError(f"override {key}={value!r}: unknown key {key!r}; known: "
                                 f"{sorted(type(self).model_fields)}")
        data = self.model_dump(exclude_unset=True) | values
        try:
            return type(self).model_validate(data)
        except ValidationError as exc:
            raise ValueError(f"invalid serve option ({validation_message(exc)})") from None


class AppArgs(ServeConfig):
    """``args`` of ``dwf_ray.serve.app:build_app`` in a Serve config file: the run root, where the token is,
    and any ServeConfig field."""
    root: str                                      # finished run root: a folder or s3://bucket/prefix
    token_file: Optional[str] = None               # else DWF_SERVE_TOKEN in the environment, else no token

    def serve_config(self) -> ServeConfig:
        return ServeConfig.model_validate(self.model_dump(exclude={"root", "token_file"}, exclude_unset=True))
