"""transformers BertForSequenceClassification behind a forward(input_ids) -> logits interface (pad id 0)."""
from __future__ import annotations

import torch
import torch.nn as nn

from dwf_ray.archs import ArchSpec, register
from dwf_ray.archs.perm_spec import AttentionSpec, PermutationSpec

RESIDUAL = "R"


class BertClassifier(nn.Module):
    """``forward(input_ids: LongTensor[B, L]) -> logits[B, num_labels]``; token id 0 is padding (masked out)."""

    def __init__(self, vocab_size: int, hidden_size: int, num_hidden_layers: int, num_attention_heads: int,
                 intermediate_size: int, max_position_embeddings: int, num_labels: int, type_vocab_size: int = 1,
                 hidden_dropout_prob: float = 0.1, attention_probs_dropout_prob: float = 0.1):
        super().__init__()
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                            num_attention_heads=num_attention_heads, intermediate_size=intermediate_size,
                            max_position_embeddings=max_position_embeddings, num_labels=num_labels,
                            type_vocab_size=type_vocab_size, hidden_dropout_prob=hidden_dropout_prob,
                            attention_probs_dropout_prob=attention_probs_dropout_prob, pad_token_id=0,
                            attn_implementation="eager")
        self.model = BertForSequenceClassification(config)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=(input_ids != 0).long()).logits


def bert_permutation_spec(spec: ArchSpec) -> PermutationSpec:
    """Per layer: attention heads (qk, vo) and intermediate units; the pooler's units; R: the residual stream."""
    args = spec.args
    e, r, pool = args["hidden_size"], RESIDUAL, "pooler"
    emb = "model.bert.embeddings"
    axes: dict[str, tuple] = {
        f"{emb}.word_embeddings.weight": (None, r), f"{emb}.position_embeddings.weight": (None, r),
        f"{emb}.token_type_embeddings.weight": (None, r),
        f"{emb}.LayerNorm.weight": (r,), f"{emb}.LayerNorm.bias": (r,),
        "model.bert.pooler.dense.weight": (pool, r), "model.bert.pooler.dense.bias": (pool,),
        "model.classifier.weight": (None, pool), "model.classifier.bias": (None,),
    }
    attention = []
    for i in range(args["num_hidden_layers"]):
        layer, p = f"model.bert.encoder.layer.{i}", f"L{i}"
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
