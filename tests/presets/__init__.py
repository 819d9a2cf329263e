"""The test presets: ``smoke`` (a file, so that the CLI and `ray job submit` take it as --preset) and
``smoke-bert`` built on it."""
from pathlib import Path

from dwf_ray.config import RunConfig
from dwf_ray.data.text import SYNTH_VOCAB_SIZE
from dwf_ray.presets import preset

SMOKE = str(Path(__file__).with_name("smoke.json"))   # a few models and steps: the end-to-end test preset


def smoke_bert() -> RunConfig:
    """A few 1-layer BERTs on a small text-synth set: the end-to-end test of token inputs and TransFusion
    (the no-canon variant is left to the MLP smoke test)."""
    return preset(SMOKE).model_copy(update={"preset": "smoke-bert"}).with_values({
        "zoo.arch": {"family": "bert", "args": {
            "vocab_size": SYNTH_VOCAB_SIZE, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 32, "max_position_embeddings": 20, "num_labels": 2, "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0}},
        "zoo.dataset": "text-synth", "zoo.dataset_args": {"n": 1500}, "zoo.n_models": 6, "zoo.epochs": 10,
        "zoo.batch_size": 32, "zoo.lr": 3e-3, "zoo.weight_decay": 0.01,
        "flow.num_workers": 1, "sample.n": 6, "eval.n_baseline": 6, "eval.compare_no_canon": False})
