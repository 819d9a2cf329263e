"""Architecture registry: an ArchSpec (family + arguments) rebuilds the model and its PermutationSpec."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable

import torch.nn as nn

from dwf_ray.archs.perm_spec import PermutationSpec


@dataclass(frozen=True)
class ArchSpec:
    family: str
    args: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"family": self.family, "args": self.args}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ArchSpec":
        obj = json.loads(text)
        return cls(family=obj["family"], args=dict(obj.get("args", {})))

    @classmethod
    def parse(cls, obj: "ArchSpec | dict | str") -> "ArchSpec":
        if isinstance(obj, ArchSpec):
            return obj
        if isinstance(obj, str):
            return cls.from_json(obj)
        return cls(family=obj["family"], args=dict(obj.get("args", {})))


@dataclass(frozen=True)
class Family:
    build: Callable[..., nn.Module]
    permutation_spec: Callable[[ArchSpec], PermutationSpec]


REGISTRY: dict[str, Family] = {}


def register(name: str, build: Callable[..., nn.Module], permutation_spec: Callable[[ArchSpec], PermutationSpec]) -> None:
    REGISTRY[name] = Family(build, permutation_spec)


def _family(spec: ArchSpec) -> Family:
    if spec.family not in REGISTRY:
        raise ValueError(f"unknown architecture family {spec.family!r}; known: {sorted(REGISTRY)}")
    return REGISTRY[spec.family]


def build_model(spec: ArchSpec | dict | str) -> nn.Module:
    spec = ArchSpec.parse(spec)
    return _family(spec).build(**spec.args)


def permutation_spec(spec: ArchSpec | dict | str) -> PermutationSpec:
    spec = ArchSpec.parse(spec)
    return _family(spec).permutation_spec(spec)


from dwf_ray.archs import mlp as _mlp  # noqa: E402,F401  (registers "mlp")
from dwf_ray.archs import cnn as _cnn  # noqa: E402,F401  (registers "cnn")
from dwf_ray.archs import cnn1d as _cnn1d  # noqa: E402,F401  (registers "cnn1d")
from dwf_ray.archs import resnet as _resnet  # noqa: E402,F401  (registers "resnet18", "resnet20")
from dwf_ray.archs import vit as _vit  # noqa: E402,F401  (registers "vit")
from dwf_ray.archs import bert as _bert  # noqa: E402,F401  (registers "bert")
from dwf_ray.archs import mzcnn as _mzcnn  # noqa: E402,F401  (registers "mz-cnn", "mz-cnn3")
