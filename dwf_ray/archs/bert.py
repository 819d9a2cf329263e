"""transformers BertForSequenceClassification behind a forward(input_ids) -> logits interface (pad id 0).

The module's parameters carry the names transformers writes (``bert.embeddings...``, ``classifier.weight``), so
a ``save_pretrained`` folder imports as it is and a generated model loads with ``from_pretrained``.
``hf_config`` and ``args_from_hf_config`` map ArchSpec arguments to a ``BertConfig`` and back: the one place
where the two meet.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn as nn

from dwf_ray.archs import ArchSpec, register
from dwf_ray.archs.perm_spec import AttentionSpec, PermutationSpec

RESIDUAL = "R"
# BertConfig keys that ArchSpec arguments carry (every other key leaves the function unchanged, or is fixed
# by this family: pad id 0, eager attention, no decoder)
_CONFIG_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "max_position_embeddings", "num_labels", "type_vocab_size", "hidden_dropout_prob",
                "attention_probs_dropout_prob", "hidden_act", "layer_norm_eps", "classifier_dropout")


def hf_config(vocab_size: int, hidden_size: int, num_hidden_layers: int, num_attention_heads: int,
              intermediate_size: int, max_position_embeddings: int, num_labels: int, type_vocab_size: int = 1,
              hidden_dropout_prob: float = 0.1, attention_probs_dropout_prob: float = 0.1, hidden_act: str = "gelu",
              layer_norm_eps: float = 1e-12, classifier_dropout: float | None = None):
    """The ``transformers.BertConfig`` of the family's arguments."""
    from transformers import BertConfig

    return BertConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                      num_attention_heads=num_attention_heads, intermediate_size=intermediate_size,
                      max_position_embeddings=max_position_embeddings, num_labels=num_labels,
                      type_vocab_size=type_vocab_size, hidden_dropout_prob=hidden_dropout_prob,
                      attention_probs_dropout_prob=attention_probs_dropout_prob, hidden_act=hidden_act,
                      layer_norm_eps=layer_norm_eps, classifier_dropout=classifier_dropout, pad_token_id=0,
                      architectures=["BertForSequenceClassification"], attn_implementation="eager")


def args_from_hf_config(config: dict) -> dict:
    """ArchSpec arguments of a transformers BERT ``config.json``: the required sizes, and each optional
    argument only where it differs from this family's default (so equal models get equal ArchSpecs)."""
    from transformers import BertConfig

    cfg = BertConfig.from_dict(config)     # fills what the file leaves out with transformers' defaults
    defaults = {k: p.default for k, p in inspect.signature(hf_config).parameters.items()
                if p.default is not inspect.Parameter.empty}
    args = {}
    for key in _CONFIG_KEYS:
        value = getattr(cfg, key)
        if key not in defaults or value != defaults[key]:
            args[key] = value
    return args


class BertClassifier(nn.Module):
    """``forward(input_ids: LongTensor[B, L]) -> logits[B, num_labels]``; token id 0 is padding (masked out).

    Holds the ``bert``, ``dropout`` and ``classifier`` modules of a ``BertForSequenceClassification`` under their
    own names, and computes its logits (its forward without the loss).
    """

    def __init__(self, **args):
        super().__init__()
        from transformers import BertForSequenceClassification

        self.config = hf_config(**args)
        hf = BertForSequenceClassification(self.config)
        self.bert, self.dropout, self.classifier = hf.bert, hf.dropout, hf.classifier

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        pooled = self.bert(input_ids=input_ids, attention_mask=(input_ids != 0).long()).pooler_output
        return self.classifier(self.dropout(pooled))


def to_transformers(model: BertClassifier):
    """The same weights in a ``transformers.BertForSequenceClassification`` (what ``save_pretrained`` writes)."""
    from transformers import BertForSequenceClassification

    hf = BertForSequenceClassification(model.config)
    hf.load_state_dict(model.state_dict(), strict=True)
    return hf.eval()


def bert_permutation_spec(spec: ArchSpec) -> PermutationSpec:
    """Per layer: attention heads (qk, vo) and intermediate units; the pooler's units; R: the residual stream."""
    args = spec.args
    e, r, pool = args["hidden_size"], RESIDUAL, "pooler"
    emb = "bert.embeddings"
    axes: dict[str, tuple] = {
        f"{emb}.word_embeddings.weight": (None, r), f"{emb}.position_embeddings.weight": (None, r),
        f"{emb}.token_type_embeddings.weight": (None, r),
        f"{emb}.LayerNorm.weight": (r,), f"{emb}.LayerNorm.bias": (r,),
        "bert.pooler.dense.weight": (pool, r), "bert.pooler.dense.bias": (pool,),
        "classifier.weight": (None, pool), "classifier.bias": (None,),
    }
    attention = []
    for i in range(args["num_hidden_layers"]):
        layer, p = f"bert.encoder.layer.{i}", f"L{i}"
        att, qk, vo, mlp = f"{layer}.attention", f"{p}.qk", f"{p}.vo", f"{p}.mlp"
        axes.update({
            f"{att}.self.query.weight": (qk, r), f"{att}.self.query.bias": (qk,),
            f"{att}.self.key.weight": (qk, r), f"{att}.self.key.bias": (qk,),
            f"{att}.self.value.weight": (vo, r), f"{att}.self.value.bias": (vo,),
            f"{att}.output.dense.weight": (r, vo), f"{att}.output.dense.bias": (r,),
            f"{att}.output.LayerNorm.weight": (r,), f"{att}.output.LayerNorm.bias": (r,),
            f"{layer}.intermediate.dense.weight": (mlp, r), f"{layer}.intermediate.dense.bias": (mlp,),
            f"{layer}.output.dense.weight": (r, mlp), f"{layer}.output.dense.bias": (r,),
            f"{layer}.output.LayerNorm.weight": (r,), f"{layer}.output.LayerNorm.bias": (r,),
        })
        attention.append(AttentionSpec(args["num_attention_heads"], e, qk, vo, q=(f"{att}.self.query.weight", 0),
                                       k=(f"{att}.self.key.weight", 0), v=(f"{att}.self.value.weight", 0)))
    return PermutationSpec(axes, tuple(attention), residual=frozenset({r}))


register("bert", BertClassifier, bert_permutation_spec)
