"""Evaluation math: win rates with confidence intervals, sequence KL, held-out LM loss.

Pure functions; the evaluation stage (orchestration/stages/evaluate.py) samples
the policies and feeds the numbers in here.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from rlhf.models import position_ids_from_mask

Scores = Sequence[float] | torch.Tensor


def _as_tensor(x: Scores) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float64).flatten()


def paired_outcomes(scores_a: Scores, scores_b: Scores) -> torch.Tensor:
    """Per prompt: 1 if a's response scores higher, 0 if lower, 0.5 on a tie."""
    a, b = _as_tensor(scores_a), _as_tensor(scores_b)
    if a.shape != b.shape:
        raise ValueError(f"need one score per prompt for both: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.numel() == 0:
        raise ValueError("no scores to compare")
    return (a > b).double() + 0.5 * (a == b).double()


def win_rate(scores_a: Scores, scores_b: Scores) -> float:
    """How often a beats b on the same prompts, ties counting half (the paper's
    labelers compare two outputs for one prompt; a tie is a coin flip)."""
    return float(paired_outcomes(scores_a, scores_b).mean())


def bootstrap_ci(values: Scores, confidence: float = 0.95, num_resamples: int = 2000,
                 seed: int = 0, weights: Scores | None = None) -> tuple[float, float]:
    """Percentile bootstrap interval for the mean of i.i.d. `values`.

    Used over prompts for win rates (each prompt's outcome 1 / 0.5 / 0) and over
    blocks for LM loss differences, so no distributional form is assumed. With
    `weights` it is the weighted mean: a pooled rate such as pairwise accuracy,
    sum(right) / sum(pairs), is the mean of per-prompt accuracies weighted by
    their pair counts, and the prompt (not the pair) is what gets resampled.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    v = _as_tensor(values)
    if v.numel() == 0:
        raise ValueError("no values to resample")
    w = torch.ones_like(v) if weights is None else _as_tensor(weights)
    if w.shape != v.shape or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError(f"need one non-negative weight per value, not all 0: {tuple(w.shape)} for {v.numel()}")
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, v.numel(), (num_resamples, v.numel()), generator=gen)
    means = (v[idx] * w[idx]).sum(dim=1) / w[idx].sum(dim=1).clamp_min(1e-300)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = torch.quantile(means, torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64))
    return float(lo), float(hi)


def nested_bootstrap_ci(groups: Sequence[Scores], confidence: float = 0.95, num_resamples: int = 2000,
                        seed: int = 0) -> tuple[float, float]:
    """Percentile interval for the mean of group means, resampling groups and then items.

    A figure measured on several seeds (groups), each over many prompts (items), varies
    with both: the outer draw picks seeds with replacement, the inner one prompts within
    each picked seed. With one group it is `bootstrap_ci` over its items; with many items
    per group its width approaches the spread of the group means alone.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    vs = [_as_tensor(g) for g in groups]
    if not vs or any(v.numel() == 0 for v in vs):
        raise ValueError("need at least one group, each with values to resample")
    gen, g = torch.Generator().manual_seed(seed), len(vs)
    # Every group resampled once per (resample, slot), so a group drawn twice into one
    # resample gets two independent inner draws; the outer draw then picks the groups.
    inner = torch.stack([v[torch.randint(0, v.numel(), (num_resamples, g, v.numel()), generator=gen)].mean(dim=2)
                         for v in vs])                                            # [G, R, slot]
    picks = torch.randint(0, g, (num_resamples, g), generator=gen)                # [R, slot]
    means = inner[picks, torch.arange(num_resamples)[:, None], torch.arange(g)].mean(dim=1)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = torch.quantile(means, torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64))
    return float(lo), float(hi)


def group_means(values: Scores, size: int) -> torch.Tensor:
    """Means of consecutive groups of `size` values: several samples of one prompt are
    correlated, so a bootstrap must resample the prompt, not its samples."""
    v = _as_tensor(values)
    if size < 1 or v.numel() % size:
        raise ValueError(f"{v.numel()} values do not split into groups of {size}")
    return v.view(-1, size).mean(dim=1)


def win_rate_ci(scores_a: Scores, scores_b: Scores, confidence: float = 0.95,
                num_resamples: int = 2000, seed: int = 0, group_size: int = 1) -> tuple[float, float]:
    """Bootstrap interval of `win_rate(scores_a, scores_b)`, resampling prompts (each
    `group_size` consecutive scores are one prompt's samples)."""
    outcomes = group_means(paired_outcomes(scores_a, scores_b), group_size)
    return bootstrap_ci(outcomes, confidence, num_resamples, seed)


def normal_ci(values: Scores, confidence: float = 0.95) -> tuple[float, float]:
    """Mean +- z * standard error (a cross-check on the bootstrap for large samples)."""
    v = _as_tensor(values)
    z = math.sqrt(2.0) * torch.special.erfinv(torch.tensor(confidence, dtype=torch.float64)).item()
    se = float(v.std(unbiased=True)) / math.sqrt(v.numel()) if v.numel() > 1 else 0.0
    m = float(v.mean())
    return m - z * se, m + z * se


def summed_log_ratio(logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                     action_mask: torch.Tensor) -> torch.Tensor:
    """[B] sum over response tokens of log pi(y_t) - log pi_ref(y_t)."""
    if logprobs.shape != ref_logprobs.shape or logprobs.shape != action_mask.shape:
        raise ValueError(f"shapes differ: {tuple(logprobs.shape)}, {tuple(ref_logprobs.shape)},"
                         f" {tuple(action_mask.shape)}")
    diff = (logprobs.double() - ref_logprobs.double()) * action_mask.double()
    return diff.sum(dim=-1)


def sequence_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                action_mask: torch.Tensor) -> float:
    """Monte Carlo KL(pi || pi_ref) per sequence: the mean over samples y ~ pi of
    log pi(y|x) - log pi_ref(y|x). Unbiased only when the samples come from pi
    at temperature 1 and both logprobs are at temperature 1."""
    return float(summed_log_ratio(logprobs, ref_logprobs, action_mask).mean())


@torch.no_grad()
def block_losses(model, blocks: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """[N] mean next-token cross entropy (nats) of each packed block."""
    if blocks.dim() != 2 or blocks.shape[1] < 2:
        raise ValueError(f"blocks must be [N, L] with L >= 2, got {tuple(blocks.shape)}")
    was_training = model.training
    model.eval()  # dropout off: the loss of the model, not of a random sub-network
    device = next(model.parameters()).device
    out = []
    try:
        for start in range(0, blocks.shape[0], batch_size):
            ids = blocks[start:start + batch_size].to(device)
            mask = torch.ones_like(ids)
            logits = model(input_ids=ids, attention_mask=mask,
                           position_ids=position_ids_from_mask(mask)).logits[:, :-1].float()
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                  reduction="none").view(ids.shape[0], -1)
            out.append(nll.mean(dim=1).double().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


def lm_loss(model, blocks: torch.Tensor, batch_size: int = 16) -> float:
    """Held-out LM loss: mean cross entropy over every predicted token of the blocks.

    Blocks share one length, so the mean of per-block means is the token mean.
    """
    return float(block_losses(model, blocks, batch_size).mean())
