"""Named presets: a RunConfig per use case (`dwf presets` lists them).

- ``digits-mlp``, ``iris-mlp``: the end-to-end MLPs;
- ``digits-cnn``, ``digits-resnet``, ``digits-vit``, ``text-bert``: one per architecture family on bundled data,
  sized to run end to end on a 2-core machine (fewer models and samples than the paper's 100; see
  docs/results-families.md);
- ``cifar10-resnet18``, ``cifar10-vit-small``, ``yelp-bert-base``: full-size configurations that read their data
  from ``zoo.data_root`` (a folder or s3:// prefix) and need a GPU cluster;
- ``smoke``, ``smoke-bert``: a few models and steps, for the end-to-end tests.
"""
from __future__ import annotations

from dwf_ray.config import FlowConfig, RunConfig, SampleConfig, ZooConfig


def _digits_mlp() -> RunConfig:
    return RunConfig(preset="digits-mlp")


def _digits_mlp_paper() -> RunConfig:
    """digits-mlp with the paper's flow and sampler: the default flow (hidden 512, source std 1.0) trained
    for 30k steps instead of 16k, RK4 100."""
    cfg = RunConfig(preset="digits-mlp-paper")
    cfg.flow, cfg.sample = FlowConfig.paper(), SampleConfig.paper()
    return cfg


def _iris_mlp() -> RunConfig:
    cfg = RunConfig(preset="iris-mlp")
    cfg.zoo = ZooConfig(dataset="iris", epochs=150, batch_size=16,
                        arch={"family": "mlp", "args": {"in_dim": 4, "hidden": [16, 16], "out_dim": 3}})
    return cfg


def _smoke() -> RunConfig:
    """A few models and steps: the end-to-end test preset."""
    cfg = RunConfig(preset="smoke")
    cfg.zoo.n_models, cfg.zoo.epochs = 12, 15
    cfg.flow.steps, cfg.flow.eval_every, cfg.flow.hidden, cfg.flow.warmup_steps = 60, 30, 64, 10
    cfg.flow.num_workers = 2         # exercises DDP
    cfg.sample.n, cfg.sample.steps = 8, 20
    cfg.eval.temperatures, cfg.eval.n_baseline = [0.5, 1.0], 12
    cfg.eval.noise_levels, cfg.eval.mix_weights = [0.25, 1.0], [0.1, 0.5]
    return cfg


# -- one preset per architecture family, on bundled data ------------------------------------------
def _family(name: str, zoo: ZooConfig, near_zoo: bool = False) -> RunConfig:
    """Shared settings of the small family presets: 50 samples and 50 models per baseline setting,
    four temperatures, flows of 8k steps (the zoo's size is set per family).

    ``near_zoo``: a narrower flow (hidden 256) from a narrower source (std 0.3), whose samples stay nearer
    the zoo; it measured better than the default flow for the ResNet, ViT and BERT zoos
    (docs/results-families.md).
    """
    cfg = RunConfig(preset=name, zoo=zoo)
    cfg.flow.steps, cfg.flow.eval_every = 8000, 500
    if near_zoo:
        cfg.flow.hidden, cfg.flow.source_std = 256, 0.3
    cfg.sample.n = 50
    cfg.eval.n_baseline = 50
    cfg.eval.temperatures = [0.7, 1.0, 1.3, 1.6]
    cfg.eval.noise_levels = [0.1, 0.25, 0.4, 0.6, 1.0]
    cfg.eval.mix_weights = [0.1, 0.2, 0.3, 0.5]
    return cfg


def _digits_cnn() -> RunConfig:
    """Two conv-BN-ReLU-pool blocks on the 1x8x8 digits; BatchNorm of every scored model recalibrated on train."""
    return _family("digits-cnn", ZooConfig(
        arch={"family": "cnn", "args": {"in_channels": 1, "image_size": 8, "channels": [16, 32], "n_classes": 10}},
        image=True, n_models=64, epochs=30))


def _digits_resnet() -> RunConfig:
    """ResNet-20 (3 stages of 3 basic blocks) at twice its standard width (channels 32, 64, 128) on the 1x8x8
    digits, aligned by activation matching: weight matching leaves aligned pairs of these networks far apart in
    function, and narrower ones are not linearly connected even after activation matching
    (docs/results-families.md)."""
    cfg = _family("digits-resnet", ZooConfig(
        arch={"family": "resnet20", "args": {"num_classes": 10, "in_channels": 1, "width": 32, "blocks_per_stage": 3}},
        image=True, n_models=64, epochs=20, batch_size=64), near_zoo=True)
    cfg.canon.method = "activations"
    return cfg


def _digits_vit() -> RunConfig:
    """A 2-layer torchvision ViT on 2x2 patches of the 1x8x8 digits (16 tokens + class token)."""
    return _family("digits-vit", ZooConfig(
        arch={"family": "vit", "args": {"image_size": 8, "patch_size": 2, "num_layers": 2, "num_heads": 2,
                                        "hidden_dim": 32, "mlp_dim": 64, "num_classes": 10, "in_channels": 1}},
        image=True, n_models=64, epochs=30), near_zoo=True)


TEXT_SYNTH_VOCAB = 107   # the text-synth tokenizer's vocabulary (4 special tokens + its words)


def _text_bert() -> RunConfig:
    """A 2-layer BERT (hidden 32, 2 heads) on the generated review-sentiment task, aligned with TransFusion."""
    return _family("text-bert", ZooConfig(
        arch={"family": "bert", "args": {"vocab_size": TEXT_SYNTH_VOCAB, "hidden_size": 32, "num_hidden_layers": 2,
                                         "num_attention_heads": 2, "intermediate_size": 64,
                                         "max_position_embeddings": 20, "num_labels": 2,
                                         "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}},
        dataset="text-synth", n_models=50, epochs=20, batch_size=64, lr=2e-3, weight_decay=0.01), near_zoo=True)


def _smoke_bert() -> RunConfig:
    """A few 1-layer BERTs on a small text-synth set: the end-to-end test of token inputs and TransFusion
    (the no-canon variant is left to the MLP smoke test)."""
    cfg = _smoke()
    cfg.preset = "smoke-bert"
    cfg.zoo = ZooConfig(
        arch={"family": "bert", "args": {"vocab_size": TEXT_SYNTH_VOCAB, "hidden_size": 16, "num_hidden_layers": 1,
                                         "num_attention_heads": 2, "intermediate_size": 32,
                                         "max_position_embeddings": 20, "num_labels": 2,
                                         "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}},
        dataset="text-synth", dataset_args={"n": 1500}, n_models=6, epochs=10, batch_size=32, lr=3e-3,
        weight_decay=0.01)
    cfg.flow.num_workers = 1
    cfg.sample.n, cfg.eval.n_baseline = 6, 6
    cfg.eval.compare_no_canon = False
    return cfg


# -- full-size configurations: data from zoo.data_root, a GPU cluster ------------------------------
def _full(name: str, zoo: ZooConfig) -> RunConfig:
    """The paper's scale: 100 models and samples, the paper's flow (hidden 512, source std 1.0, 30k steps,
    RK4 100); PCA, canonicalization and scoring spread over the cluster."""
    cfg = RunConfig(preset=name, zoo=zoo)
    cfg.canon.max_actors, cfg.canon.actor_cpus = 16, 1.0
    cfg.pca.n_shards = 16
    cfg.flow = FlowConfig.paper()
    cfg.eval.num_gpus = 0.25
    return cfg


def _cifar10_resnet18() -> RunConfig:
    """torchvision ResNet-18 with the CIFAR stem (3x3 conv1, no max-pool): 11.2M parameters."""
    return _full("cifar10-resnet18", ZooConfig(
        arch={"family": "resnet18", "args": {"num_classes": 10, "in_channels": 3, "cifar_stem": True}},
        dataset="cifar10", n_models=100, epochs=30, batch_size=128, lr=2e-3, weight_decay=5e-4, cpus_per_model=4))


def _cifar10_vit_small() -> RunConfig:
    """ViT-Small shapes (12 layers, 6 heads, width 384, MLP 1536) on 4x4 patches of 32x32 images: 21.3M parameters."""
    return _full("cifar10-vit-small", ZooConfig(
        arch={"family": "vit", "args": {"image_size": 32, "patch_size": 4, "num_layers": 12, "num_heads": 6,
                                        "hidden_dim": 384, "mlp_dim": 1536, "num_classes": 10, "in_channels": 3}},
        dataset="cifar10", n_models=100, epochs=100, batch_size=128, lr=1e-3, weight_decay=0.05, cpus_per_model=4))


def _yelp_bert_base() -> RunConfig:
    """BERT-Base shapes (12 layers, 12 heads, hidden 768, 30522 tokens, 512 positions) as a 5-class classifier of
    Yelp review stars (Parquet text/label files; 128 tokens). Reports accuracy (the paper reports Spearman)."""
    return _full("yelp-bert-base", ZooConfig(
        arch={"family": "bert", "args": {"vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12,
                                         "num_attention_heads": 12, "intermediate_size": 3072,
                                         "max_position_embeddings": 512, "num_labels": 5, "type_vocab_size": 2}},
        dataset="text-parquet", dataset_args={"max_len": 128, "vocab_size": 30522}, n_models=100, epochs=2,
        batch_size=32, lr=1e-4, weight_decay=0.01, cpus_per_model=4))


PRESETS = {"digits-mlp": _digits_mlp, "digits-mlp-paper": _digits_mlp_paper, "iris-mlp": _iris_mlp, "smoke": _smoke,
           "digits-cnn": _digits_cnn, "digits-resnet": _digits_resnet, "digits-vit": _digits_vit,
           "text-bert": _text_bert, "smoke-bert": _smoke_bert,
           "cifar10-resnet18": _cifar10_resnet18, "cifar10-vit-small": _cifar10_vit_small,
           "yelp-bert-base": _yelp_bert_base}
FULL_SIZE = ("cifar10-resnet18", "cifar10-vit-small", "yelp-bert-base")


def preset(name: str) -> RunConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
    return PRESETS[name]()
