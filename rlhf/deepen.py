"""Depth up-scaling: more transformer blocks on a trained model, and the same function at the start.

The paper's RM (6B) is larger than its policy (1.3B), pretrained on its own. Pretraining
and fine-tuning a second, larger tiny model costs more than our whole RM stage, so the
RM grows from the SFT model instead: each added block is a copy of an existing one
(block i % n) with the projections that write into the residual stream zeroed, so it
adds nothing until training moves them. The deepened model computes exactly what the
original does, with spare depth to learn the comparisons (docs/experiments.md).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from rlhf.sharding import transformer_blocks

# The last projection of an attention or MLP sub-block, by family: GPT-2 (c_proj, both),
# Llama/Mistral/Qwen (o_proj, down_proj), OPT/BART (out_proj, fc2), GPT-NeoX (dense, dense_4h_to_h).
RESIDUAL_WRITERS = ("c_proj", "o_proj", "down_proj", "out_proj", "fc2", "dense", "dense_4h_to_h")


def _block_list(model: nn.Module) -> nn.ModuleList:
    blocks = transformer_blocks(model)
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) == len(blocks) and all(a is b for a, b in zip(m, blocks)):
            return m
    raise ValueError(f"{type(model).__name__}: its transformer blocks are not one ModuleList")


def _silence(block: nn.Module) -> int:
    """Zero the block's residual writers (weights and biases); how many there were."""
    found = 0
    with torch.no_grad():
        for name, m in block.named_modules():
            if name.rsplit(".", 1)[-1] in RESIDUAL_WRITERS and hasattr(m, "weight"):
                m.weight.zero_()
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
                found += 1
    return found


def add_layers(model: nn.Module, extra: int) -> int:
    """Append `extra` identity-initialised blocks to `model`'s stack in place; the new depth."""
    blocks = _block_list(model)
    n = len(blocks)
    if extra <= 0:
        return n
    for i in range(n, n + extra):
        block = copy.deepcopy(blocks[i % n])
        if _silence(block) < 2:  # an attention and an MLP output, or the block would not be identity
            raise ValueError(f"{type(block).__name__}: cannot find both residual projections to zero "
                             f"(looked for {', '.join(RESIDUAL_WRITERS)})")
        for m in block.modules():  # Llama-style attention indexes its KV cache by layer
            if hasattr(m, "layer_idx"):
                m.layer_idx = i
        blocks.append(block)
    config = model.config
    config.num_hidden_layers = n + extra  # GPT-2's n_layer through its attribute map
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i % n] for i in range(n + extra)]
    return n + extra
