"""The off-policy correction of asynchronous rollouts: decoupled PPO (Hilton et al., 2021).

With `ppo.async_rollouts` a batch is sampled by an older policy, the behaviour policy
pi_b (weights v_{k-s}, s <= ppo.max_staleness), while the learners are at v_k. Three
policies meet in the objective:

    pi_b     sampled the tokens: its logprobs come with the rollout (the sampler's own)
    pi_prox  the learner at the start of the iteration, v_k: the recomputed "old" logprobs,
             the anchor of the clip (so the trust region is around v_k, not around pi_b)
    pi       the weights being trained

    L = - E_{pi_b} [ w * min(r * A, clip(r, 1 - eps, 1 + eps) * A) ],
        r = pi / pi_prox,   w = min(pi_prox / pi_b, c)   (per token, no gradient through w)

w turns the expectation over pi_b into one over pi_prox, which is what the on-policy
PPO step assumes; truncating it at c (`ppo.behaviour_weight_cap`) bounds the variance a
token whose probability jumped between versions would add, at the cost of a small bias
(as V-trace truncates its weights). We chose this over an importance weight on the whole
ratio (pi / pi_b, clipped) because the clip then still measures how far one iteration
moves the policy, whatever the staleness. With no staleness pi_b is pi_prox and w is
left out altogether, so the synchronous loss is exactly the paper's.
"""
from __future__ import annotations

import torch
from torch import Tensor

from rlhf.masked import as_bool, masked_mean


@torch.no_grad()
def behaviour_weights(proximal_logprobs: Tensor, behaviour_logprobs: Tensor, mask: Tensor,
                      cap: float) -> tuple[Tensor, dict[str, float]]:
    """w = min(pi_prox / pi_b, cap) per token ([B, T], 1 under the mask's zeros), and its stats:

    behaviour_weight_mean  masked mean of w before truncation (1 in expectation over pi_b
                           when both policies share support: a check on the sampler's logprobs)
    behaviour_weight_max   the largest untruncated weight
    behaviour_weights_truncated  fraction of tokens whose weight the cap cut
    """
    valid = as_bool(mask)
    log_w = torch.where(valid, proximal_logprobs.float() - behaviour_logprobs.float(),
                        torch.zeros_like(proximal_logprobs, dtype=torch.float32))
    raw = torch.exp(log_w)
    w = torch.clamp(raw, max=cap)
    stats = {"behaviour_weight_mean": float(masked_mean(raw, mask)),
             "behaviour_weight_max": float(raw[valid].max()) if valid.any() else 1.0,
             "behaviour_weights_truncated": float(masked_mean((raw > cap).float(), mask))}
    return w, stats
