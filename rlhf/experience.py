"""The typed containers that flow through one PPO iteration (DESIGN §3).

Token alignment, used everywhere: position t of a per-token tensor refers to the
token at t. `logprobs[:, t]` = log pi(token_t | tokens_<t); `values[:, t]` = V of
the state just before token_t (the head read at t-1). Position 0 is never an
action. `action_mask` marks response tokens (including the EOS that ended one).
Rows from different generators may place their prompts at different offsets;
all math goes through the masks, never through token ids or offsets.
"""
from __future__ import annotations

import dataclasses

import torch

from rlhf.batch import TensorBatch


@dataclasses.dataclass
class Rollout(TensorBatch):
    """What a generator returns: sampled sequences and the weights they came from."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    action_mask: torch.Tensor
    sampler_logprobs: torch.Tensor
    prompts: list            # prompt text per row (the gold labeler reads it)
    weight_version: int


@dataclasses.dataclass
class Experience(TensorBatch):
    """A scored rollout with everything the learners need for one PPO update."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    action_mask: torch.Tensor
    old_logprobs: torch.Tensor   # recomputed by the learner, not trusted from the sampler
    ref_logprobs: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor     # whitened over valid tokens of the whole batch
    returns: torch.Tensor
    weight_version: int
