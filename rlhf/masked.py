"""Reductions over valid tokens only.

`mask` is a [B, T] bool or 0/1 float tensor. Validity comes from the mask alone,
never from token ids (pad id may equal EOS id). Padded positions are selected
away with `torch.where` rather than multiplied by 0, so NaN/inf sitting under
padding (e.g. logprobs of pad tokens) cannot leak into a result.
"""

from __future__ import annotations

import torch
from torch import Tensor


def as_bool(mask: Tensor) -> Tensor:
    """The mask as a bool tensor (nonzero = valid)."""
    return mask if mask.dtype == torch.bool else mask != 0


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of `x` over valid positions (all of them, or along `dim`)."""
    kept = torch.where(as_bool(mask), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return kept.sum() if dim is None else kept.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `x` over valid positions.

    An empty selection gives 0 (not NaN) so an all-padding minibatch contributes
    no gradient; this avoids a device sync inside the loss path.
    """
    count = as_bool(mask).to(x.dtype)
    count = count.sum() if dim is None else count.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp_min(1)


def masked_count(mask: Tensor) -> int:
    """Number of valid positions."""
    return int(as_bool(mask).sum().item())


def global_share(local: float, global_total: float, world: int) -> float:
    """Factor turning a worker's local mean into its share of the global mean.

    The one normalisation of every token- or example-mean loss trained on several
    workers (the Ray Train stages and the PPO learners): gradients are averaged over
    `world` workers, so local_mean * local * world / global_total, averaged, is
    sum(local sums) / global_total, the mean over the global batch whatever the
    shards' sizes, and N workers make the update one would. An empty global batch gives 0.
    """
    return local * world / global_total if global_total else 0.0


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = False) -> Tensor:
    """Variance of all valid entries of `x` (a scalar)."""
    n = masked_count(mask)
    if n < (2 if unbiased else 1):
        raise ValueError(f"masked_var needs more valid entries, got {n}")
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        var = var * (n / (n - 1))
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise valid entries to unit variance (and zero mean if `shift_mean`).

    Statistics use valid tokens only; padded positions of the output are 0.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(as_bool(mask), out, torch.zeros((), dtype=out.dtype, device=out.device))


def last_valid_index(mask: Tensor) -> Tensor:
    """Index of the last valid position of each row: LongTensor[B].

    Works whatever side the padding is on. A row with no valid token raises.
    """
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B, T], got shape {tuple(mask.shape)}")
    valid = as_bool(mask)
    positions = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    # position+1 where valid, 0 elsewhere: the row max is (last index + 1), or 0 if empty
    last = torch.where(valid, positions, torch.zeros_like(positions)).max(dim=1).values - 1
    if bool((last < 0).any()):
        empty = torch.nonzero(last < 0).flatten().tolist()
        raise ValueError(f"rows with no valid token: {empty}")
    return last
