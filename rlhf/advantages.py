"""Per-token rewards with the KL penalty, and generalised advantage estimation.

Validity comes from `mask` only. Positions are [B, T]; the valid response span
may sit anywhere in the row (left-padded prompts before it, right padding after
it for shorter responses).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rlhf.masked import as_bool, last_valid_index


@torch.no_grad()
def kl_shaped_rewards(
    logprobs: Tensor, ref_logprobs: Tensor, rm_scores: Tensor, mask: Tensor, kl_coef: float
) -> tuple[Tensor, Tensor]:
    """Paper's per-token reward: -beta * (log pi - log pi_ref) on every valid
    token, plus the RM score on the last valid token of each row.

    Returns (rewards[B, T], kl[B, T]); both are 0 on padding and detached.
    `kl` is the per-token sample log-ratio log pi - log pi_ref.
    """
    valid = as_bool(mask)
    kl = torch.where(valid, (logprobs - ref_logprobs).float(), torch.zeros((), device=logprobs.device))
    last = last_valid_index(mask)
    end_bonus = F.one_hot(last, num_classes=mask.shape[1]).float() * rm_scores.float()[:, None]
    rewards = -kl_coef * kl + end_bonus
    return rewards, kl


@torch.no_grad()
def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation, backward over time.

    delta_t = r_t + gamma * V(next valid t') - V_t, A_t = delta_t + gamma*lam*A_t'.
    The value after a row's last valid token is 0 (the episode ends there).
    Padding positions are skipped: they neither receive advantage nor break the
    recursion, so any pad layout works. Returns (advantages, returns) with
    returns = advantages + values, both 0 on padding and detached.
    """
    valid = as_bool(mask)
    r = rewards.float()
    v = values.float()
    batch, length = r.shape
    advantages = torch.zeros_like(r)
    next_value = torch.zeros(batch, device=r.device)
    next_adv = torch.zeros(batch, device=r.device)
    for t in reversed(range(length)):
        m = valid[:, t]
        delta = r[:, t] + gamma * next_value - v[:, t]
        adv_t = delta + gamma * lam * next_adv
        advantages[:, t] = torch.where(m, adv_t, torch.zeros_like(adv_t))
        # carry the state unchanged across padding
        next_value = torch.where(m, v[:, t], next_value)
        next_adv = torch.where(m, adv_t, next_adv)
    returns = torch.where(valid, advantages + v, torch.zeros_like(v))
    return advantages, returns
