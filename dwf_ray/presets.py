"""Named presets: each is data, a dict of ``section.key`` overrides (the ``--set`` form) on the default
RunConfig (which is ``digits-mlp``). ``dwf presets`` lists them; ``--preset FILE.json`` reads one from a file.

- ``digits-mlp``, ``iris-mlp``: the end-to-end MLPs; ``digits-mlp-paper`` with the paper's flow and sampler;
- ``mnist1d-mlp``, ``mnist1d-cnn``: MNIST-1D's own MLP and CNN; ``mnist1d-mlp-scale``: a smaller MLP for zoos of
  thousands;
- ``digits-cnn``, ``digits-resnet``, ``digits-vit``, ``text-bert``: one per architecture family on bundled data,
  sized to run end to end on a 2-core machine (fewer models and samples than the paper's 100; see
  docs/results-families.md);
- ``cifar10-resnet18``, ``cifar10-vit-small``, ``yelp-bert-base``: full-size configurations that read their data
  from ``zoo.data_root`` (a folder or s3:// prefix) and need a GPU cluster.

Test presets (``smoke``, ``smoke-bert``) live beside the tests, in tests/presets/.
"""
from __future__ import annotations

import json
from pathlib import Path

from dwf_ray.config import PAPER_FLOW, PAPER_SAMPLER, RunConfig
from dwf_ray.data.text import SYNTH_VOCAB_SIZE


def _section(name: str, values: dict) -> dict:
    return {f"{name}.{k}": v for k, v in values.items()}


# Shared settings of the small family presets: 50 samples and 50 models per baseline setting, four
# temperatures, flows of 8k steps (the zoo's size is set per family).
_FAMILY = {"flow.steps": 8000, "flow.eval_every": 500, "sample.n": 50, "eval.n_baseline": 50,
           "eval.temperatures": [0.7, 1.0, 1.3, 1.6], "eval.noise_levels": [0.1, 0.25, 0.4, 0.6, 1.0],
           "eval.mix_weights": [0.1, 0.2, 0.3, 0.5]}
# A narrower flow from a narrower source, whose samples stay nearer the zoo; it measured better than the
# default flow for the ResNet, ViT and BERT zoos (docs/results-families.md).
_NEAR_ZOO = {"flow.hidden": 256, "flow.source_std": 0.3}
# The paper's scale: 100 models and samples, the paper's flow and sampler; canonicalization, PCA and scoring
# spread over a GPU cluster.
_FULL = {"canon.max_actors": 16, "canon.actor_cpus": 1.0, "pca.n_shards": 16, **_section("flow", PAPER_FLOW),
         "eval.num_gpus": 0.25}

# MNIST-1D (dataset ``mnist1d``, built offline): the package's own MLP (``MLPBase`` with its authors' current
# arguments: 40-256-256-10, the second hidden layer adding its input, ``residual``; 8,000 steps, 222 epochs of 36
# batches) and CNN (``ConvBase`` as ``cnn1d``; 100 epochs), trained as its authors train them
# (Adam at a constant 1e-2, batches of 100, no weight decay), each zoo in lockstep chunks; ``mnist1d-mlp-scale``
# is a 40-32-32-10 MLP for zoos of thousands (docs/results-scaling.md).
_MNIST1D = {"zoo.dataset": "mnist1d", "zoo.batch_size": 100, "zoo.lr": 1e-2, "zoo.lr_schedule": "constant",
            "zoo.weight_decay": 0.0}
_MNIST1D_MLP = {"family": "mlp", "args": {"in_dim": 40, "hidden": [256, 256], "out_dim": 10, "residual": True}}
_MNIST1D_CNN = {"family": "cnn1d", "args": {"in_length": 40, "channels": [25, 25, 25], "kernels": [5, 3, 3],
                                            "strides": [2, 2, 2], "padding": 1, "n_classes": 10}}

_TEXT_SYNTH_BERT = {"vocab_size": SYNTH_VOCAB_SIZE, "max_position_embeddings": 20, "num_labels": 2,
                    "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}

PRESETS: dict[str, dict] = {
    # the source at 0.1 of the standard Gaussian: generated models keep the zoo's accuracy at functional novelty
    # 0.6 and pass the function-space rule; 1.0 (the paper's flow) ties noise at 2.8 (docs/results-quality.md)
    "digits-mlp": {"flow.source_std": 0.1},
    "digits-mlp-paper": {**_section("flow", PAPER_FLOW), **_section("sample", PAPER_SAMPLER)},
    "iris-mlp": {"zoo.dataset": "iris", "zoo.epochs": 150, "zoo.batch_size": 16,
                 "zoo.arch": {"family": "mlp", "args": {"in_dim": 4, "hidden": [16, 16], "out_dim": 3}}},
    "mnist1d-mlp": {**_MNIST1D, "zoo.epochs": 222, "zoo.arch": _MNIST1D_MLP},
    "mnist1d-cnn": {**_MNIST1D, "zoo.epochs": 100, "zoo.arch": _MNIST1D_CNN},
    "mnist1d-mlp-scale": {**_MNIST1D, "zoo.epochs": 30, "zoo.n_models": 1000, "canon.batch_size": 128, "pca.max_k": 256, "zoo.arch": {
        "family": "mlp", "args": {"in_dim": 40, "hidden": [32, 32], "out_dim": 10}}},
    # two conv-BN-ReLU-pool blocks on the 1x8x8 digits
    "digits-cnn": {**_FAMILY, "zoo.image": True, "zoo.n_models": 64, "zoo.epochs": 30, "zoo.arch": {
        "family": "cnn", "args": {"in_channels": 1, "image_size": 8, "channels": [16, 32], "n_classes": 10}}},
    # ResNet-20 at twice its standard width, aligned by activation matching: narrower ResNets are not
    # linearly connected even after it (docs/results-families.md)
    "digits-resnet": {**_FAMILY, **_NEAR_ZOO, "zoo.image": True, "zoo.n_models": 64, "zoo.epochs": 20,
                      "zoo.batch_size": 64, "canon.method": "activations", "zoo.arch": {
                          "family": "resnet20",
                          "args": {"num_classes": 10, "in_channels": 1, "width": 32, "blocks_per_stage": 3}}},
    # a 2-layer torchvision ViT on 2x2 patches of the 1x8x8 digits (16 tokens + class token)
    "digits-vit": {**_FAMILY, **_NEAR_ZOO, "zoo.image": True, "zoo.n_models": 64, "zoo.epochs": 30, "zoo.arch": {
        "family": "vit", "args": {"image_size": 8, "patch_size": 2, "num_layers": 2, "num_heads": 2,
                                  "hidden_dim": 32, "mlp_dim": 64, "num_classes": 10, "in_channels": 1}}},
    # a 2-layer BERT (hidden 32, 2 heads) on the generated review-sentiment task, aligned with TransFusion
    "text-bert": {**_FAMILY, **_NEAR_ZOO, "zoo.dataset": "text-synth", "zoo.n_models": 50, "zoo.epochs": 20,
                  "zoo.batch_size": 64, "zoo.lr": 2e-3, "zoo.weight_decay": 0.01, "zoo.arch": {
                      "family": "bert", "args": {**_TEXT_SYNTH_BERT, "hidden_size": 32, "num_hidden_layers": 2,
                                                 "num_attention_heads": 2, "intermediate_size": 64}}},
    # torchvision ResNet-18 with the CIFAR stem (3x3 conv1, no max-pool): 11.2M parameters
    "cifar10-resnet18": {**_FULL, "zoo.dataset": "cifar10", "zoo.n_models": 100, "zoo.epochs": 30,
                         "zoo.batch_size": 128, "zoo.lr": 2e-3, "zoo.weight_decay": 5e-4, "zoo.cpus_per_model": 4,
                         "zoo.arch": {"family": "resnet18",
                                      "args": {"num_classes": 10, "in_channels": 3, "cifar_stem": True}}},
    # ViT-Small shapes (12 layers, 6 heads, width 384, MLP 1536) on 4x4 patches of 32x32 images: 21.3M parameters
    "cifar10-vit-small": {**_FULL, "zoo.dataset": "cifar10", "zoo.n_models": 100, "zoo.epochs": 100,
                          "zoo.batch_size": 128, "zoo.lr": 1e-3, "zoo.weight_decay": 0.05, "zoo.cpus_per_model": 4,
                          "zoo.arch": {"family": "vit", "args": {
                              "image_size": 32, "patch_size": 4, "num_layers": 12, "num_heads": 6, "hidden_dim": 384,
                              "mlp_dim": 1536, "num_classes": 10, "in_channels": 3}}},
    # BERT-Base shapes as a 5-class classifier of Yelp review stars (Parquet text/label files; 128 tokens).
    # Reports accuracy (the paper reports Spearman).
    "yelp-bert-base": {**_FULL, "zoo.dataset": "text-parquet", "zoo.dataset_args": {"max_len": 128, "vocab_size": 30522},
                       "zoo.n_models": 100, "zoo.epochs": 2, "zoo.batch_size": 32, "zoo.lr": 1e-4,
                       "zoo.weight_decay": 0.01, "zoo.cpus_per_model": 4, "zoo.arch": {"family": "bert", "args": {
                           "vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                           "intermediate_size": 3072, "max_position_embeddings": 512, "num_labels": 5,
                           "type_vocab_size": 2}}},
}
FULL_SIZE = ("cifar10-resnet18", "cifar10-vit-small", "yelp-bert-base")


def preset(name: str, _chain: tuple = ()) -> RunConfig:
    """A named preset, or a JSON file of overrides: ``{"base": NAME or FILE (optional), "set": {key: value}}``
    (the file's name, without .json, becomes the preset's name)."""
    if name in PRESETS:
        return RunConfig(preset=name).with_values(PRESETS[name])
    path = Path(name)
    if path.suffix != ".json":
        raise ValueError(f"unknown preset {name!r}; available: {sorted(PRESETS)}, or a .json file of overrides")
    if path.resolve() in _chain:
        raise ValueError(f"preset file {name}: its base chain comes back to it")
    try:
        spec = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"preset file {name}: {exc}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("base", ""), str) \
            or not isinstance(spec.get("set", {}), dict) or set(spec) - {"base", "set"}:
        raise ValueError(f'preset file {name}: expected an object {{"base": NAME or FILE, "set": {{key: value}}}}')
    base = spec.get("base", "digits-mlp")
    if base.endswith(".json"):
        base = str(path.parent / base)
    try:
        cfg = preset(base, _chain + (path.resolve(),))
        return cfg.model_copy(update={"preset": path.stem}).with_values(spec.get("set", {}))
    except ValueError as exc:
        raise ValueError(f"preset file {name}: {exc}") from None
