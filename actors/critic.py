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

from actors.learner import Learner
from rlhf.config import OptimizerConfig, PPOConfig
from rlhf.experience import Experience
from rlhf.forward import token_values
from rlhf.losses import value_loss
from rlhf.masked import masked_count, masked_mean
from rlhf.models import ScalarModel


class CriticLearner(Learner):
    def __init__(self, critic_path: str, ppo: PPOConfig | None = None,
                 optimizer: OptimizerConfig | None = None, seed: int = 0,
                 num_threads: int | None = None, device: str = "auto", dtype: str | None = None,
                 bucket_cap_mb: float = 64.0, forward_batch_size: int = 64) -> None:
        super().__init__(ppo, optimizer, seed, num_threads, device, dtype, bucket_cap_mb, forward_batch_size)
        # eval(): no dropout, so the values that trained are the values that were scored.
        self.model = ScalarModel.from_pretrained(critic_path, dtype=self.dtype).to(self.device).eval()
        self.start_training(self.ppo.critic_lr)
        self.iteration = 0

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, T] float32 V(state before token_t) (alignment of rlhf.experience)."""
        return self.forward_in_batches(lambda i, m: token_values(self.model, i, m), input_ids, attention_mask)

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
        stats.update(value_loss=float(loss.detach()), values_mean=float(masked_mean(v.detach(), exp.action_mask)),
                     **self.step_stats(norm, skipped))
        return stats

    def end_iteration(self) -> int:
        self.scheduler.step()
        self.iteration += 1
        return self.iteration

    def state_dict_for_checkpoint(self) -> dict[str, Any]:
        return self.snapshot(iteration=self.iteration)

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        self.iteration = int(self.restore(state)["iteration"])

    def save_pretrained(self, path: str) -> str:
        return str(self.model.save_pretrained(Path(path)))
