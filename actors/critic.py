"""CriticLearner: one rank of the value-model group (initialised from the RM, as in the paper).

Scores per-token values for GAE and trains with the clipped value loss; same
group mechanics as the policy (the loss a mean over the whole minibatch's tokens,
bucketed all-reduce, one Adam step per minibatch, non-finite skip) and the same
warmup-then-constant LR schedule at `ppo.critic_lr`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from actors.group import BucketedGrads, DistributedWorker
from actors.resources import configure_threads, parse_dtype, pick_device
from actors.weight_sync import checksum
from rlhf.config import OptimizerConfig, PPOConfig
from rlhf.experience import Experience
from rlhf.forward import token_values
from rlhf.losses import value_loss
from rlhf.masked import masked_count, masked_mean
from rlhf.models import ScalarModel
from rlhf.schedules import lambda_lr, warmup_then_constant
from rlhf.train_state import make_optimizer, restore, snapshot


class CriticLearner(DistributedWorker):
    def __init__(self, critic_path: str, ppo: PPOConfig | None = None,
                 optimizer: OptimizerConfig | None = None, seed: int = 0,
                 num_threads: int | None = None, device: str = "auto", dtype: str | None = None,
                 bucket_cap_mb: float = 64.0, forward_batch_size: int = 64) -> None:
        configure_threads(num_threads)
        torch.manual_seed(seed)
        self.device = pick_device(device)
        self.ppo = ppo or PPOConfig()
        self.opt_cfg = optimizer or OptimizerConfig()
        # eval(): no dropout, so the values that trained are the values that were scored.
        self.model = ScalarModel.from_pretrained(critic_path, dtype=parse_dtype(dtype)).to(self.device).eval()
        self.optimizer = make_optimizer(self.model.parameters(), self.ppo.critic_lr, self.opt_cfg)
        self.scheduler = lambda_lr(self.optimizer, warmup_then_constant,
                                   warmup_iters=self.ppo.warmup_iterations,
                                   start_fraction=self.ppo.warmup_start_fraction)
        self.grads = BucketedGrads(
            [(n, p) for n, p in self.model.named_parameters() if p.requires_grad],
            int(bucket_cap_mb * 2**20))
        self.forward_batch_size = forward_batch_size
        self.iteration = 0

    def trained_module(self) -> torch.nn.Module:
        return self.model

    @torch.no_grad()
    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, T] float32 V(state before token_t) (alignment of rlhf.experience)."""
        n = self.forward_batch_size
        return torch.cat([token_values(self.model, i.to(self.device), m.to(self.device)).cpu()
                          for i, m in zip(input_ids.split(n), attention_mask.split(n))])

    def train_minibatch(self, exp_shard: Experience) -> dict[str, float]:
        """One clipped-value-loss step on this rank's shard; returns this rank's stats.

        The gradient is that of the minibatch-wide token mean; value_loss, vf_clipfrac
        and values_mean are means over this rank's tokens (the driver averages ranks).
        """
        exp = exp_shard.to(self.device)
        (share,) = self.global_token_shares(masked_count(exp.action_mask))
        self.optimizer.zero_grad(set_to_none=True)
        v = token_values(self.model, exp.input_ids, exp.attention_mask)
        loss, stats = value_loss(v, exp.old_values, exp.returns, exp.action_mask,
                                 clip=self.ppo.value_clip)
        (loss * share).backward()  # share 1.0 (exact) on one rank
        self.grads.capture()
        norm, skipped = self.synced_step(self.grads, self.optimizer, self.opt_cfg.max_grad_norm)
        stats.update(
            value_loss=float(loss.detach()),
            values_mean=float(masked_mean(v.detach(), exp.action_mask)),
            grad_norm=norm,
            lr=self.scheduler.get_last_lr()[0],
            skipped=float(skipped),
            nonfinite_steps=float(self.nonfinite_steps),
        )
        return stats

    def end_iteration(self) -> int:
        self.scheduler.step()
        self.iteration += 1
        return self.iteration

    def checksum(self) -> str:
        return checksum(self.model.named_parameters())

    def state_dict_for_checkpoint(self) -> dict[str, Any]:
        return snapshot(self.model, self.optimizer, self.scheduler, iteration=self.iteration,
                        nonfinite_steps=self.nonfinite_steps)

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        extra = restore(state, self.model, self.optimizer, self.scheduler)
        self.iteration, self.nonfinite_steps = int(extra["iteration"]), int(extra["nonfinite_steps"])

    def save_pretrained(self, path: str) -> str:
        return str(self.model.save_pretrained(Path(path)))
