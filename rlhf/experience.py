"""The typed containers that flow through one PPO iteration (docs/architecture.md).

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

from rlhf.advantages import gae, kl_shaped_rewards
from rlhf.batch import TensorBatch
from rlhf.losses import explained_variance
from rlhf.masked import masked_whiten
from rlhf.off_policy import behaviour_weights


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
    # Asynchronous rollouts sampled by older weights: min(pi_old / pi_sampler, cap) per token
    # (rlhf/off_policy.py); None when the sampler's weights are the learner's (the paper's PPO).
    behaviour_weights: torch.Tensor | None = None


@torch.no_grad()
def build_experience(rollout: Rollout, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                     values: torch.Tensor, rm_scores: torch.Tensor, kl_coef: float,
                     gamma: float, lam: float, behaviour_weight_cap: float | None = None
                     ) -> tuple[Experience, dict]:
    """Scores -> per-token KL-shaped rewards -> GAE -> advantages whitened over the batch.

    `behaviour_weight_cap`: the rollout came from older weights than `old_logprobs`; the
    Experience carries the truncated behaviour weights of the decoupled PPO objective.
    Returns the Experience and the batch statistics the driver logs.
    """
    mask = rollout.action_mask
    weights, weight_stats = None, {}
    if behaviour_weight_cap is not None:
        weights, weight_stats = behaviour_weights(old_logprobs, rollout.sampler_logprobs, mask,
                                                  behaviour_weight_cap)
    rewards, kl = kl_shaped_rewards(old_logprobs, ref_logprobs, rm_scores, mask, kl_coef)
    advantages, returns = gae(rewards, values * mask, mask, gamma=gamma, lam=lam)
    exp = Experience(
        input_ids=rollout.input_ids, attention_mask=rollout.attention_mask, action_mask=mask,
        old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, old_values=values * mask,
        advantages=masked_whiten(advantages, mask), returns=returns,
        weight_version=rollout.weight_version, behaviour_weights=weights)
    valid = mask.bool()
    stats = {
        "rm_score_mean": rm_scores.float().mean().item(),
        "rm_score_std": rm_scores.float().std().item() if len(rm_scores) > 1 else 0.0,
        "kl_per_sequence": (kl * mask).sum(1).mean().item(),
        "kl_per_token": kl[valid].mean().item(),
        "response_length": mask.sum(1).float().mean().item(),
        "sampler_learner_logprob_gap": (rollout.sampler_logprobs - old_logprobs)[valid].abs().mean().item(),
        "explained_variance": explained_variance(values, returns, mask),
        "advantage_raw_std": advantages[valid].std().item() if valid.sum() > 1 else 0.0,
    } | weight_stats
    return exp, stats
