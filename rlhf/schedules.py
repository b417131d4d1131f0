"""Learning-rate multipliers from the paper (Appendix C).

SFT and RM: cosine decay to 10% of the initial LR, no warmup.
PPO: constant LR, linear warmup over the first 10 iterations from 1/10 of peak.
Each function returns a multiplier of the base LR, for LambdaLR.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR


def cosine_to_fraction(step: int, total_steps: int, final_fraction: float = 0.1) -> float:
    """1.0 at step 0, `final_fraction` from `total_steps` on, cosine in between."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    progress = min(max(step, 0) / total_steps, 1.0)
    return final_fraction + (1.0 - final_fraction) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_then_constant(iteration: int, warmup_iters: int = 10, start_fraction: float = 0.1) -> float:
    """Linear from `start_fraction` at iteration 0 to 1.0 at `warmup_iters`, then 1.0."""
    if warmup_iters <= 0 or iteration >= warmup_iters:
        return 1.0
    progress = max(iteration, 0) / warmup_iters
    return start_fraction + (1.0 - start_fraction) * progress


def lambda_lr(optimizer: torch.optim.Optimizer, fn: Callable[..., float], **kwargs) -> LambdaLR:
    """LambdaLR over `fn(step, **kwargs)`.

    A functools.partial (not a lambda) keeps the scheduler picklable, which
    matters when a learner actor is checkpointed or shipped by Ray.
    """
    return LambdaLR(optimizer, lr_lambda=functools.partial(fn, **kwargs))
