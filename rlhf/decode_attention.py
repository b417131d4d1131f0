"""Attention for decoding: sdpa, except that one-query steps take two plain matmuls.

On the CPU, torch's fused attention kernel is tuned for many queries: for the
single query of a decoding step over views of a KV cache it took 1.2-2x the time of
`softmax(q k^T * scale + mask) v` as two batched matmuls (batch 64-256, 4 heads of 32,
timed alone), and with this the hf engine went from 1.23x to ~1.5x `model.generate` on
the tiny model (bench/generation.py, 2026-12-07). Every other call (prompt passes,
training, scoring) goes to transformers' own sdpa function unchanged, so a model
switched to this implementation computes the same function everywhere.
"""
from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "sdpa_one_query"
# Attention variants the matmul path does not implement: such calls go to sdpa.
_SPECIAL_KWARGS = ("sliding_window", "softcap", "s_aux", "position_bias", "cache")


def one_query_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                        **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: query [B, H, q, D], key/value [B, Hkv, L, D] -> ([B, q, H, D], None)."""
    special = any(kwargs.get(k) is not None for k in _SPECIAL_KWARGS)
    if query.shape[2] != 1 or special or (dropout > 0 and module.training) or kwargs.get("output_attentions"):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    b, heads, _, d = query.shape
    kv_heads = key.shape[1]
    # Grouped queries share their key head: [B, Hkv, group, D] against [B, Hkv, L, D].
    q = query.reshape(b, kv_heads, heads // kv_heads, d) * (d ** -0.5 if scaling is None else scaling)
    scores = torch.matmul(q, key.transpose(-1, -2))
    if attention_mask is not None:  # [B, 1, 1, L]: True (or 0.0) where attended
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill_(~attention_mask, float("-inf"))
        else:
            scores += attention_mask
    probs = torch.softmax(scores, -1, dtype=torch.float32).to(value.dtype)
    return torch.matmul(probs, value).reshape(b, 1, heads, value.shape[-1]), None


AttentionInterface.register(NAME, one_query_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)


# Architectures whose attention is exactly softmax(q k^T * scale + mask) v. Others (local
# windows, soft-capping, attention sinks) keep their own implementation and masks.
MODEL_TYPES = ("gpt2", "llama")


def use_for_decoding(model) -> bool:
    """Switch a plain-attention model on transformers' sdpa to this implementation; True if it runs it."""
    config = model.config
    if config._attn_implementation == "sdpa" and config.model_type in MODEL_TYPES:
        model.set_attn_implementation(NAME)
    return config._attn_implementation == NAME
