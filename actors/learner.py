"""What the policy and critic learners share: start-up, the optimizer and LR schedule,
batched no-grad forwards, step stats and checkpoint state.

Both train with Adam on a warmup-then-constant schedule over PPO iterations, one
step per minibatch from gradients all-reduced in flat buckets (`DistributedWorker`).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from actors.group import BucketedGrads, DistributedWorker
from actors.resources import configure_threads, parse_dtype, pick_device
from actors.weight_sync import checksum
from rlhf.config import OptimizerConfig, PPOConfig
from rlhf.schedules import lambda_lr, warmup_then_constant
from rlhf.train_state import make_optimizer, restore, snapshot


class Learner(DistributedWorker):
    model: torch.nn.Module

    def __init__(self, ppo: PPOConfig | None, optimizer: OptimizerConfig | None, seed: int,
                 num_threads: int | None, device: str, dtype: str | None, bucket_cap_mb: float,
                 forward_batch_size: int) -> None:
        configure_threads(num_threads)
        torch.manual_seed(seed)
        self.device = pick_device(device)
        self.dtype = parse_dtype(dtype)
        self.ppo = ppo or PPOConfig()
        self.opt_cfg = optimizer or OptimizerConfig()
        self.cap_bytes = int(bucket_cap_mb * 2**20)
        self.forward_batch_size = forward_batch_size

    def start_training(self, lr: float) -> None:
        """Optimizer, schedule and gradient buffers over `self.model`'s final parameters."""
        self.optimizer = make_optimizer(self.model.parameters(), lr, self.opt_cfg)
        self.scheduler = lambda_lr(self.optimizer, warmup_then_constant,
                                   warmup_iters=self.ppo.warmup_iterations,
                                   start_fraction=self.ppo.warmup_start_fraction)
        self.grads = BucketedGrads(
            [(n, p) for n, p in self.model.named_parameters() if p.requires_grad], self.cap_bytes)

    def trained_module(self) -> torch.nn.Module:
        return self.model

    @torch.no_grad()
    def forward_in_batches(self, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                           input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """fn(ids, mask) over `forward_batch_size` rows at a time, on the CPU."""
        n = self.forward_batch_size
        return torch.cat([fn(i.to(self.device), m.to(self.device)).cpu()
                          for i, m in zip(input_ids.split(n), attention_mask.split(n))])

    def step_stats(self, grad_norm: float, skipped: bool) -> dict[str, float]:
        return {"grad_norm": grad_norm, "lr": self.scheduler.get_last_lr()[0], "skipped": float(skipped),
                "nonfinite_steps": float(self.nonfinite_steps)}

    def checksum(self) -> str:
        return checksum(self.model.named_parameters())

    def snapshot(self, **extra: Any) -> dict[str, Any]:
        return snapshot(self.model, self.optimizer, self.scheduler, nonfinite_steps=self.nonfinite_steps, **extra)

    def restore(self, state: dict[str, Any]) -> dict[str, Any]:
        extra = restore(state, self.model, self.optimizer, self.scheduler)
        self.nonfinite_steps = int(extra["nonfinite_steps"])
        return extra
