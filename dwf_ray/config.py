"""Pydantic configs of every stage (the named presets are in dwf_ray.presets)."""
from __future__ import annotations

import json
from typing import Annotated, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


# The paper's flow: hidden 512, time embedding 64, dropout 0.1, AdamW 5e-4 with a cosine schedule, 30k steps,
# sigma 0.001, standard Gaussian source; and its sampler, RK4 with 100 steps.
PAPER_FLOW = {"hidden": 512, "time_dim": 64, "dropout": 0.1, "lr": 5e-4, "schedule": "cosine", "steps": 30000,
              "sigma": 0.001, "source": "gaussian", "source_std": 1.0}
PAPER_SAMPLER = {"solver": "rk4", "steps": 100}

# The ODE solvers of sampling, the one table of their names (dwf_ray/flow/solvers.py runs them): the fixed-step
# ones take a step count, dopri5 is adaptive.
FIXED_STEP_SOLVERS = ("euler", "midpoint", "rk4")
SOLVERS = FIXED_STEP_SOLVERS + ("dopri5",)


class _Cfg(BaseModel):
    model_config = ConfigDict(extra="forbid")


# Bounds shared by many fields: every count, rate and fraction is checked before any work starts.
Count = Annotated[int, Field(ge=1)]          # sizes, steps, numbers of things
NonNegInt = Annotated[int, Field(ge=0)]      # retries, seeds, indices
Positive = Annotated[float, Field(gt=0)]     # learning rates, temperatures, scales, CPUs
NonNeg = Annotated[float, Field(ge=0)]       # weight decays, GPUs, noise levels


class ZooConfig(_Cfg):
    arch: dict = Field(default_factory=lambda: {"family": "mlp", "args": {
        "in_dim": 64, "hidden": [32, 32], "out_dim": 10, "activation": "relu"}})
    dataset: str = "digits"
    dataset_args: dict = Field(default_factory=dict)   # extra arguments of the dataset loader
    data_root: Optional[str] = None  # folder or s3:// prefix of datasets that do not ship bundled
    classes: Optional[list[NonNegInt]] = Field(None, min_length=1)   # keep only these classes, relabelled 0..len-1
    image: bool = False              # feed 1x8x8 images instead of flat vectors
    split_seed: NonNegInt = 0
    n_models: Count = 100
    seed0: NonNegInt = 0
    epochs: Count = 40
    batch_size: Count = 32
    lr: Positive = 3e-3
    lr_schedule: Literal["cosine", "constant"] = "cosine"   # constant: MNIST-1D's own recipe (Adam at 1e-2)
    weight_decay: NonNeg = 0.05
    cpus_per_model: Positive = 1.0   # CPUs of each training task
    # models trained together in one task (torch.func, dwf_ray/zoo/lockstep.py); None: chunks for the families
    # that allow it (mlp, cnn1d), one model per task for the others
    models_per_task: Optional[int] = Field(None, ge=1)
    max_retries: NonNegInt = 2       # a model whose worker dies is trained 1 + this many times, then an error row


class CanonConfig(_Cfg):
    enabled: bool = True             # False: copy weights unchanged (the --no-canon ablation)
    method: Literal["weights", "activations"] = "weights"   # how permutations are found (see dwf_ray/canon)
    activation_samples: Count = 512  # method=activations: training inputs run through each model (their unit
                                     # outputs, all positions, are kept for the reference: mind conv nets)
    residual: bool = False           # transformers: also permute the residual stream (beyond the paper)
    reference: NonNegInt = 0         # model index of the reference
    max_iter: Count = 100
    seed: NonNegInt = 0
    min_actors: Count = 1
    max_actors: Optional[Count] = None   # None: the pool grows as far as the cluster's CPUs/GPUs allow
    actor_cpus: Positive = 0.5
    actor_gpus: NonNeg = 0.0
    batch_size: Count = 8
    # a checkpoint whose worker dies in its batch is then tried alone 1 + this many times, then an error row
    max_retries: NonNegInt = 2


class PCAConfig(_Cfg):
    k: Optional[int] = None          # a fixed number of components; None: variance_target, at most max_k
    # by default the smallest k keeping this share of the variance (None: all), at most max_k, so that the flow's
    # dimension stops growing with the zoo (why these values: docs/results-pca.md)
    variance_target: Optional[float] = 0.99
    max_k: Optional[int] = 1024
    side: Literal["auto", "gram", "covariance"] = "auto"   # n x n Gram (column shards) or d x d covariance
                                     # (row shards); auto: the smaller one
    n_shards: Count = 2
    shard_cpus: Positive = 0.5       # also the BLAS/torch threads of a shard (at least 1)
    shard_gpus: NonNeg = 0.0
    memory_budget_bytes: Count = 2 << 30   # peak memory of one GramShard process: sets its block size, not d
    engine: Literal["auto", "numpy", "torch"] = "auto"   # auto: torch (on the GPU) when shard_gpus > 0
    compute_dtype: Literal["float32", "float64"] = "float32"   # products; blocks are summed in float64
    input_dtype: Literal["float32", "bfloat16", "float16"] = "float32"   # torch engine: inputs of the products
    max_restarts: NonNegInt = 2      # a shard actor (Gram or row side) that dies is restarted and redoes its pass

    @field_validator("k", "max_k")
    @classmethod
    def _at_least_one(cls, v: Optional[int], info) -> Optional[int]:
        if v is not None and v < 1:       # k's upper bound, n - 1 (and the rank), is checked by the fit
            raise ValueError(f"{v} is outside {'[1, n - 1]' if info.field_name == 'k' else '[1, inf)'}")
        return v

    @field_validator("variance_target")
    @classmethod
    def _a_share(cls, v: Optional[float]) -> Optional[float]:
        if v is not None and not 0 < v <= 1:
            raise ValueError(f"{v} is outside (0, 1]")
        return v

    def resolved_engine(self) -> str:
        return ("torch" if self.shard_gpus > 0 else "numpy") if self.engine == "auto" else self.engine


class FlowConfig(_Cfg):
    hidden: Count = 512
    depth: Count = 3
    time_dim: int = Field(64, ge=2, multiple_of=2)   # sines and cosines: even
    dropout: float = Field(0.1, ge=0, lt=1)
    lr: Positive = 5e-4
    weight_decay: NonNeg = 1e-4
    steps: Count = 16000
    batch_size: Count = 64           # global batch, split across the DDP workers
    warmup_steps: NonNegInt = 200
    scaling: Literal["whiten", "global", "none"] = "whiten"   # latent standardisation
    source_std: Positive = 1.0       # the paper's; smaller keeps samples nearer the zoo (digits-mlp: 0.1)
    sigma: NonNeg = 0.001
    ema_decay: float = Field(0.999, ge=0, lt=1)
    source: Literal["gaussian", "uniform"] = "gaussian"   # source noise, unit variance per dimension
    time_dist: Literal["uniform", "logit_normal"] = "uniform"   # training times t
    time_loc: float = 0.0            # logit-normal times: t = sigmoid(time_loc + time_scale * N(0, 1))
    time_scale: Positive = 1.0
    schedule: Literal["cosine", "constant"] = "cosine"   # learning rate after the linear warmup
    p_uncond: float = Field(0.1, ge=0, lt=1)   # conditional flows: probability of the null label (guidance)
    ot_coupling: bool = False
    holdout_fraction: float = Field(0.1, gt=0, lt=1)   # latents held out to choose the checkpoint
    select_after: float = Field(0.5, ge=0, lt=1)   # only checkpoints from this fraction of training on are candidates
    eval_every: Count = 1000
    num_workers: Count = 1
    use_gpu: Optional[bool] = None   # None: use GPUs when the Ray cluster has them
    max_failures: NonNegInt = 2
    seed: NonNegInt = 0

    def resolved_use_gpu(self) -> bool:
        if self.use_gpu is not None:
            return self.use_gpu
        from dwf_ray.runtime import cluster_gpus
        return cluster_gpus() >= 1

    @classmethod
    def paper(cls, **overrides) -> "FlowConfig":
        return cls(**{**PAPER_FLOW, **overrides})


class SampleConfig(_Cfg):
    n: Count = 100
    solver: Literal[SOLVERS] = "rk4"
    steps: Count = 100
    temperature: Positive = 1.0         # source-noise scale at sampling time
    seed: NonNegInt = 1234

    @classmethod
    def paper(cls, **overrides) -> "SampleConfig":
        return cls(**{**PAPER_SAMPLER, **overrides})


class EvalConfig(_Cfg):
    temperatures: list[Positive] = Field(min_length=1, default=[0.7, 1.0, 1.2, 1.5, 1.8])
    # baselines, each at several strengths (dwf_ray/eval/baselines.py)
    noise_levels: list[Positive] = [0.1, 0.25, 0.4, 0.6, 0.8, 1.0]   # noise norm / zoo median NN distance
    layer_noise_levels: list[Positive] = [0.05, 0.1, 0.2, 0.4]        # noise std / each tensor's RMS
    average_ks: list[Count] = [2, 4, 8, 16]                           # means of k distinct zoo models
    mix_weights: list[Annotated[float, Field(gt=0, le=1)]] = [0.05, 0.1, 0.2, 0.3, 0.4, 0.5]      # (1 - w) a + w b
    gaussian_scales: list[Positive] = [0.25, 0.5, 1.0]                 # N(zoo mean, (scale x zoo std)^2)
    n_baseline: Count = 100
    accept_novelty: NonNeg = 0.5      # an operating point must reach this functional novelty to be accepted
    bn_recal_batches: NonNegInt = 20
    compare_no_canon: bool = False   # ablation: also run canon-free PCA/flow/sample for the report
    weight_novelty: bool = True      # diagnostic: distances in weight space up to permutation (costly)
    nn_candidates: Count = 2           # zoo models matched per model, in weight space and in function space each
    num_gpus: NonNeg = 0.0            # GPUs per scoring / matching task (large models); 0: CPU
    # The zoo's own statistics (its nearest-neighbour D and S: the unit of functional novelty; its matched and
    # direct weight distances) cost n^2 comparisons: they are measured on this many zoo models, drawn uniformly
    # without replacement with `seed`, each against the whole zoo (itself left out); on every zoo model when the
    # zoo is no larger. metrics.json (diversity.zoo_reference) and report.md say which.
    zoo_sample: int = Field(1000, ge=1)
    chunk_models: int = Field(500, ge=1)   # models per scoring task at most (outputs stay in the object store)
    nn_block: int = Field(2000, ge=1)      # zoo models per nearest-neighbour task (its memory grows with it)
    seed: NonNegInt = 7


class RunConfig(_Cfg):
    preset: str = "custom"
    zoo: ZooConfig = Field(default_factory=ZooConfig)
    canon: CanonConfig = Field(default_factory=CanonConfig)
    pca: PCAConfig = Field(default_factory=PCAConfig)
    flow: FlowConfig = Field(default_factory=FlowConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _sizes_agree(self) -> "RunConfig":
        """Values that bound each other (each alone is checked by its field)."""
        if self.canon.reference >= self.zoo.n_models:
            raise ValueError(f"canon.reference={self.canon.reference}: outside [0, zoo.n_models - 1 = "
                             f"{self.zoo.n_models - 1}]")
        if self.canon.max_actors is not None and self.canon.max_actors < self.canon.min_actors:
            raise ValueError(f"canon.max_actors={self.canon.max_actors}: below canon.min_actors="
                             f"{self.canon.min_actors}")
        if self.flow.batch_size < self.flow.num_workers:
            raise ValueError(f"flow.batch_size={self.flow.batch_size}: below flow.num_workers="
                             f"{self.flow.num_workers} (the batch is split across the workers)")
        return self

    @property
    def compares_no_canon(self) -> bool:
        """Whether the report compares against the same run without canonicalization (the no-canon variant)."""
        return self.eval.compare_no_canon and self.canon.enabled

    def with_overrides(self, overrides: list[str]) -> "RunConfig":
        """Apply ``section.key=value`` overrides (values parsed as JSON, else kept as strings)."""
        return self.with_values(parse_overrides(overrides, "section.key=value"))

    def with_values(self, values: dict) -> "RunConfig":
        """Apply ``{"section.key": value}`` (the --set form, values already parsed); a preset is a dict of these.
        An unknown key, or a value of the wrong type, is a ValueError naming it."""
        data = self.model_dump()
        for key, value in values.items():
            node = data
            *path, last = key.split(".")
            for part in path:
                if part not in node or not isinstance(node[part], dict):
                    raise ValueError(f"override {key}={value!r}: no config section {part!r}")
                node = node[part]
            if last not in node and path[-1:] != ["args"]:
                raise ValueError(f"override {key}={value!r}: unknown key {last!r}")
            node[last] = value
        try:
            return RunConfig.model_validate(data)
        except ValidationError as exc:
            raise ValueError(f"invalid config value ({validation_message(exc)})") from None


def parse_overrides(overrides: list[str], form: str = "key=value") -> dict:
    """``--set``-style ``key=value`` items as {key: value}: each value parsed as JSON, else kept as a string; an
    item without "=" is a ValueError naming ``form``."""
    values = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not of the form {form}")
        try:
            values[key] = json.loads(raw)
        except json.JSONDecodeError:
            values[key] = raw
    return values


def validation_message(exc: ValidationError) -> str:
    """Each error as ``key=value: allowed range`` (``key: message`` where the message already names the value)."""
    parts = []
    for e in exc.errors():
        key, msg = ".".join(map(str, e["loc"])) or "config", e["msg"]
        if msg.startswith("Value error, "):      # our own validators name the value and the range
            parts.append(f"{key}: {msg}" if e["loc"] else msg.removeprefix("Value error, "))
        else:
            parts.append(f"{key}={json.dumps(e['input'], default=str)}: {msg}")
    return "; ".join(parts)
