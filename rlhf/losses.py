"""Losses of the InstructGPT recipe: K-way ranking RM loss, PPO policy and
value losses, the ptx (pretraining) LM loss, and their diagnostics.

All per-token quantities are [B, T] with a validity `mask`; validity is never
inferred from token ids.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from rlhf.masked import as_bool, masked_mean, masked_var

# ---------------------------------------------------------------- reward model


def ranking_pairs(ranks: Sequence[int]) -> list[tuple[int, int]]:
    """All (winner, loser) index pairs with distinct ranks (lower rank wins).

    Ties produce no pair. Without ties this is C(K, 2) pairs.
    """
    k = len(ranks)
    return [(i, j) for i in range(k) for j in range(k) if ranks[i] < ranks[j]]


def rm_ranking_loss(
    scores: Tensor, ranks: Tensor, group_ids: Tensor
) -> tuple[Tensor, dict[str, float]]:
    """Paper's K-way ranking loss from one score per completion.

    `scores[N]` holds the RM output of every completion of every prompt (K
    forward passes per prompt, not 2*C(K,2)); `group_ids[N]` says which prompt
    each belongs to; K may differ between prompts. Per prompt:
    loss_g = -1/n_pairs_g * sum_{(w,l)} log sigmoid(r_w - r_l), with
    n_pairs_g = C(K,2) when there are no ties. The batch loss is the mean over
    prompts with at least one pair, so every prompt weighs the same whatever
    its K (the paper's point: no overfitting from repeated completions).

    If no prompt has a pair (all ties) the loss is a graph-connected 0 and
    stats report n_pairs=0.
    """
    if not (scores.dim() == ranks.dim() == group_ids.dim() == 1):
        raise ValueError("scores, ranks and group_ids must be 1-D [N]")
    if not (scores.shape == ranks.shape == group_ids.shape):
        raise ValueError("scores, ranks and group_ids must have the same length")
    s = scores.float()
    _, group = torch.unique(group_ids, return_inverse=True)
    n_groups = int(group.max().item()) + 1 if group.numel() else 0

    # pairs[i, j]: i beats j within the same prompt
    pairs = (group[:, None] == group[None, :]) & (ranks[:, None] < ranks[None, :])
    diff = s[:, None] - s[None, :]
    logsig = torch.where(pairs, F.logsigmoid(diff), torch.zeros_like(diff))

    # bucket each pair by its winner's group (winner and loser share it)
    per_group_sum = torch.zeros(n_groups, device=s.device).index_add(0, group, logsig.sum(1))
    per_group_n = torch.zeros(n_groups, device=s.device).index_add(0, group, pairs.sum(1).float())
    has_pairs = per_group_n > 0
    n_pairs = int(per_group_n.sum().item())
    if n_pairs == 0:
        return s.sum() * 0.0, {"accuracy": 0.0, "n_pairs": 0, "margin": 0.0}

    loss_g = -per_group_sum[has_pairs] / per_group_n[has_pairs]
    loss = loss_g.mean()

    with torch.no_grad():
        margins = diff[pairs]
        stats = {
            "accuracy": float((margins > 0).float().mean().item()),
            "n_pairs": n_pairs,
            "margin": float(margins.mean().item()),
        }
    return loss, stats


def rm_bias(demo_scores: Tensor) -> float:
    """Bias to add to the RM so labeler demonstrations score 0 on average."""
    if demo_scores.numel() == 0:
        raise ValueError("rm_bias needs at least one demonstration score")
    return -float(demo_scores.detach().float().mean().item())


# ---------------------------------------------------------------- token stats


def _tempered(logits: Tensor, temperature: float) -> Tensor:
    # At T == 1 the logits are used as they are (not divided by 1.0), so default runs
    # keep their exact numbers.
    return logits if temperature == 1.0 else logits / temperature


def logprobs_from_logits(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits[b, t] / temperature)[tokens[b, t]]: [B, T] float32 (float64 stays).

    Gathers the chosen logit and subtracts logsumexp instead of materialising a
    full [B, T, V] log_softmax. Half-precision logits are upcast one row at a
    time, so at most one [T, V] float32 copy exists; the temperature divides
    after the upcast, as the sampler does.
    """
    if logits.dtype in (torch.float32, torch.float64):
        x = _tempered(logits, temperature)
        picked = x.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        return picked - torch.logsumexp(x, dim=-1)
    rows = []
    for row_logits, row_tokens in zip(logits, tokens):
        row = _tempered(row_logits.float(), temperature)
        picked = row.gather(-1, row_tokens.unsqueeze(-1)).squeeze(-1)
        rows.append(picked - torch.logsumexp(row, dim=-1))
    return torch.stack(rows)


def entropy_from_logits(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy of softmax(logits / temperature) at each position: [B, T] (float32, float64 stays)."""
    x = _tempered(logits if logits.dtype == torch.float64 else logits.float(), temperature)
    p = torch.softmax(x, dim=-1)
    return torch.logsumexp(x, dim=-1) - (p * x).sum(-1)


# ---------------------------------------------------------------- PPO


def policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip: float = 0.2,
    weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """PPO clipped surrogate, masked mean over valid tokens.

    `weights` (asynchronous rollouts only): each token's term times its behaviour weight,
    the decoupled objective of rlhf/off_policy.py; None, as the paper's synchronous PPO.

    stats:
      clipfrac   fraction of valid tokens where the clipped branch is the max
                 (its gradient is then 0);
      approx_kl  masked mean of the k3 estimator (r - 1) - log r, r = p/p_old,
                 an unbiased, non-negative estimate of KL(old || new) on
                 samples from the old policy;
      ratio_mean masked mean of r.
    """
    valid = as_bool(mask)
    # zero log-ratio under padding so exp() cannot overflow on garbage logprobs
    log_ratio = torch.where(valid, logprobs - old_logprobs, torch.zeros_like(logprobs))
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    per_token = torch.maximum(unclipped, clipped)
    loss = masked_mean(per_token if weights is None else weights.detach() * per_token, mask)

    with torch.no_grad():
        stats = {
            "clipfrac": float(masked_mean((clipped > unclipped).float(), mask).item()),
            "approx_kl": float(masked_mean((ratio - 1.0) - log_ratio, mask).item()),
            "ratio_mean": float(masked_mean(ratio, mask).item()),
        }
    return loss, stats


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float = 0.2
) -> tuple[Tensor, dict[str, float]]:
    """Clipped value loss: 0.5 * masked mean of max((v-R)^2, (v_clip-R)^2),
    v_clip = old + clamp(v - old, -clip, clip).

    stats: vf_clipfrac, fraction of valid tokens where the clipped term is the max.
    """
    v_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    err = (values - returns) ** 2
    err_clipped = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    with torch.no_grad():
        stats = {"vf_clipfrac": float(masked_mean((err_clipped > err).float(), mask).item())}
    return loss, stats


# ---------------------------------------------------------------- ptx


def ptx_targets(loss_mask: Tensor) -> Tensor:
    """Which next-token predictions the ptx loss averages: [B, T-1] (token t+1 is a target)."""
    return loss_mask[:, 1:]


def ptx_lm_loss(logits: Tensor, input_ids: Tensor, loss_mask: Tensor) -> Tensor:
    """Causal LM loss for the pretraining mix; mean over valid targets.

    Position t predicts token t+1; `loss_mask[b, t]` marks whether token t of
    `input_ids` is a target, so loss_mask[:, 0] is never used (nothing predicts
    the first token). Always at temperature 1: it trains the model itself, not
    the sampler. Computed in float32 (float64 stays).
    """
    return masked_mean(next_token_nll(logits, input_ids), ptx_targets(loss_mask))


def next_token_nll(logits: Tensor, input_ids: Tensor) -> Tensor:
    """[B, T-1] -log p(token t+1 | <= t) at temperature 1, in float32 (float64 stays)."""
    pred = logits[:, :-1, :]
    target = input_ids[:, 1:]
    pred = pred if pred.dtype == torch.float64 else pred.float()
    return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="none").view_as(target)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """1 - Var[R - V] / Var[R] over valid tokens; NaN when Var[R] is 0."""
    with torch.no_grad():
        var_r = masked_var(returns.float(), mask)
        if float(var_r.item()) == 0.0:
            return float("nan")
        var_res = masked_var((returns - values).float(), mask)
        return float((1.0 - var_res / var_r).item())
