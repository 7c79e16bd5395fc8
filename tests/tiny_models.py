"""Tiny random Llama / Mistral models and predictors for fast CPU tests."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from butler_zoo import ButlerConfig, ButlerPredictor, SparsePolicy

VOCAB = 128

# name -> (family, query heads, kv heads, extra config)
TINY_SPECS = {
    "llama-gqa": ("llama", 4, 2, {}),
    "llama-mha": ("llama", 4, 4, {}),
    "mistral-gqa": ("mistral", 4, 2, {"sliding_window": 24}),
    "mistral-mha": ("mistral", 4, 4, {"sliding_window": 24}),
}


def tiny_model(name: str = "llama-gqa", layers: int = 5, seed: int = 0, attn_implementation: str = "sdpa"):
    family, heads, kv_heads, extra = TINY_SPECS[name]
    torch.manual_seed(seed)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        attn_implementation=attn_implementation,
        pad_token_id=0,
        **extra,
    )
    cls_cfg, cls = (LlamaConfig, LlamaForCausalLM) if family == "llama" else (MistralConfig, MistralForCausalLM)
    return cls(cls_cfg(**common)).eval()


def tiny_predictor(model, seed: int = 1, stride: int = 2, query_heads: str = "kv", **policy) -> ButlerPredictor:
    torch.manual_seed(seed)
    cfg = ButlerConfig.for_model(
        model.config,
        sketch_dim=8,
        mlp_dim=32,
        producer_stride=stride,
        query_heads=query_heads,
        policy=SparsePolicy(**{"sinks": 2, "window": 4, "budget": 12, **policy}).to_dict(),  # 6 predicted
    )
    return ButlerPredictor(cfg)


def left_padded_batch(lengths=(30, 22), seed: int = 3):
    """Token ids and a 2D mask for a left-padded batch (pad id 0)."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, width - n :] = torch.randint(1, VOCAB, (n,), generator=g)
        mask[i, width - n :] = 1
    return ids, mask
