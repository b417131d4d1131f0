"""Batched sampling with a KV cache: the `hf` rollout engine's core.

Prompts are left-padded so every row's next token sits in the same column;
positions come from the attention mask. Rows stop at EOS or after
`max_new_tokens`; finished rows keep stepping (their tokens are padding, masked
out) until all are done. Returns each sampled token's logprob under the
sampling distribution (temperature applied).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
from transformers import DynamicCache

from rlhf.batch import TensorBatch
from rlhf.models import position_ids_from_mask


@dataclasses.dataclass
class Samples(TensorBatch):
    """prompt (left-padded) + response (right-padded) in one [B, P+R] tensor."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    action_mask: torch.Tensor      # 1 on response tokens (including the EOS that ended it)
    sampler_logprobs: torch.Tensor  # [B, P+R], 0 outside the action mask
    prompt_width: int


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
    return ids, mask


def _filter_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    drop = cum - sorted_logits.softmax(-1) > top_p  # keep the token that crosses top_p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


@torch.no_grad()
def sample(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos_id: int, pad_id: int,
           temperature: float = 1.0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> Samples:
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    batch, width = ids.shape
    out_tokens = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
    out_logp = torch.zeros((batch, max_new_tokens), device=device)
    out_mask = torch.zeros((batch, max_new_tokens), dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    cache = DynamicCache()
    step_ids, step_pos, attn = ids, position_ids_from_mask(mask), mask
    for t in range(max_new_tokens):
        logits = model(input_ids=step_ids, attention_mask=attn, position_ids=step_pos,
                       past_key_values=cache, use_cache=True).logits[:, -1, :].float()
        logp = torch.log_softmax(_filter_top_p(logits / temperature, top_p), dim=-1)
        token = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)
        alive = ~done
        out_tokens[:, t] = torch.where(alive, token, pad_id)
        out_logp[:, t] = torch.where(alive, logp.gather(1, token[:, None]).squeeze(1), 0.0)
        out_mask[:, t] = alive.long()
        done = done | (token == eos_id)
        if bool(done.all()):
            out_tokens, out_logp, out_mask = out_tokens[:, : t + 1], out_logp[:, : t + 1], out_mask[:, : t + 1]
            break
        # Finished rows still step (keeps the cache rectangular) but stay unattended.
        attn = torch.cat([attn, alive.long()[:, None]], dim=1)
        step_pos = (attn.sum(1, keepdim=True) - 1).clamp(min=0)
        step_ids = out_tokens[:, t: t + 1]
    full_ids = torch.cat([ids, out_tokens], dim=1)
    full_mask = torch.cat([mask, out_mask], dim=1)
    action = torch.cat([torch.zeros_like(mask), out_mask], dim=1)
    logps = torch.cat([torch.zeros(mask.shape, device=device), out_logp], dim=1)
    return Samples(full_ids.cpu(), full_mask.cpu(), action.cpu(), logps.cpu(), width)
