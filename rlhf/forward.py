"""Per-token forward passes with the alignment of rlhf/experience.py.

Positions come from the attention mask, so left-padded prompts (as generators
produce them) give the same numbers as unpadded ones.
"""
from __future__ import annotations

import torch

from rlhf.losses import entropy_from_logits, logprobs_from_logits
from rlhf.models import ScalarModel, additive_mask, position_ids_from_mask


def policy_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T, V] logits. A [B, 1, T, T] bool mask (packed rows, rlhf.collate) comes with its position_ids."""
    packed = attention_mask.dim() == 4
    if packed and position_ids is None:
        raise ValueError("a 4-D attention mask needs position_ids")
    if packed:
        attention_mask = additive_mask(attention_mask, getattr(model, "module", model).dtype)  # DDP wraps
    # use_cache off: a scoring or training forward never continues, and HF's KV cache would
    # hold two [B, T, d] tensors per layer (60 GB for a 6B reference scoring 64 rows).
    return model(input_ids=input_ids, attention_mask=attention_mask,
                 position_ids=position_ids_from_mask(attention_mask) if position_ids is None else position_ids,
                 use_cache=False).logits


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   with_entropy: bool = False, temperature: float = 1.0):
    """[B, T] log pi_T(token_t | <t) (0 at t=0); optionally also the entropy at each t.

    pi_T = softmax(logits / temperature). Scoring rollouts (the PPO learner, the
    reference) uses the sampler's temperature so ratios and KL compare the
    distribution the tokens were drawn from; evaluation measures the model at 1.
    float32, or float64 for a float64 model.
    """
    logits = policy_logits(model, input_ids, attention_mask)[:, :-1]
    lp = logprobs_from_logits(logits, input_ids[:, 1:], temperature)
    out = torch.zeros(input_ids.shape, dtype=lp.dtype, device=input_ids.device)
    out[:, 1:] = lp
    if not with_entropy:
        return out
    ent = torch.zeros_like(out)
    ent[:, 1:] = entropy_from_logits(logits, temperature)
    return out, ent


def token_values(critic: ScalarModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
                 ) -> torch.Tensor:
    """[B, T] V(state before token_t): the head read at t-1 (0 at t=0)."""
    head = critic.values(input_ids, attention_mask)
    out = torch.zeros_like(head)
    out[:, 1:] = head[:, :-1]
    return out
