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
from rlhf import sharding
from rlhf.models import ScalarModel
from rlhf.sharding import TrainLayout


class CriticLearner(Learner):
    def __init__(self, critic_path: str, ppo: PPOConfig | None = None,
                 optimizer: OptimizerConfig | None = None, seed: int = 0,
                 num_threads: int | None = None, device: str = "auto", layout: TrainLayout | None = None,
                 bucket_cap_mb: float = 64.0, forward_batch_size: int = 64) -> None:
        super().__init__(ppo, optimizer, seed, num_threads, device, layout, bucket_cap_mb, forward_batch_size)
        self.critic_path = str(critic_path)
        self.lr = self.ppo.critic_lr
        # eval(): no dropout, so the values that trained are the values that were scored.
        self.model = ScalarModel.from_pretrained(critic_path, dtype=torch.float32).to(self.device).eval()
        self.iteration = 0
        self.begin()

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, T] float32 V(state before token_t) (alignment of rlhf.experience)."""
        return self.forward_in_batches(lambda i, m: token_values(self.model, i, m), input_ids, attention_mask)

    def train_minibatch(self, exp_shard: Experience) -> dict[str, float]:
        """One clipped-value-loss step on this rank's shard; returns this rank's stats.

        The gradient is that of the minibatch-wide token mean (in one piece or in
        `ppo.micro_batch_size` pieces); value_loss, vf_clipfrac and values_mean are
        means over this rank's tokens (the driver averages ranks).
        """
        self._require_started()
        exp = exp_shard.to(self.device)
        n = masked_count(exp.action_mask)
        (share,) = self.global_token_shares(n)
        pieces = self.micro_batches(len(exp))
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        for part in exp.chunk(pieces):
            if not len(part):  # a rank with fewer episodes than the group's busiest
                self.idle_pass(lambda i, m: token_values(self.model, i, m), backward=True)
                continue
            with self.compute():
                v = token_values(self.model, part.input_ids, part.attention_mask)
            loss, stats = value_loss(v, part.old_values, part.returns, part.action_mask,
                                     clip=self.ppo.value_clip)
            w = masked_count(part.action_mask) / n if n else 1.0 / pieces
            self.backward(loss * share * w)  # share 1.0 and w 1.0 (exact) on one rank, one piece
            stats.update(value_loss=float(loss.detach()),
                         values_mean=float(masked_mean(v.detach(), part.action_mask)))
            for k, val in stats.items():
                sums[k] = sums.get(k, 0.0) + w * val
        self.grads.capture()
        norm, skipped = self.synced_step(self.grads, self.optimizer, self.opt_cfg.max_grad_norm, self.scaler)
        return sums | self.step_stats(norm, skipped)

    def end_iteration(self) -> int:
        self.scheduler.step()
        self.iteration += 1
        return self.iteration

    def state_dict_for_checkpoint(self) -> dict[str, Any]:
        return self.snapshot(iteration=self.iteration)

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        self.iteration = int(self.restore(state)["iteration"])

    def plain_state(self) -> dict[str, Any]:
        return super().plain_state() | {"iteration": self.iteration}

    def load_plain_state(self, state: dict[str, Any]) -> dict[str, Any]:
        super().load_plain_state(state)
        self.iteration = int(state["iteration"])
        return state

    def save_pretrained(self, path: str) -> str | None:
        """An HF directory of the value model (rank 0; gathered first when sharded)."""
        if self.layout.sharded:
            weights = sharding.full_state_dict(self.model)
            if self.rank != 0:
                return None
            model = ScalarModel.from_pretrained(self.critic_path, dtype=torch.float32)
            model.load_state_dict(weights)
            return str(model.save_pretrained(Path(path)))
        return str(self.model.save_pretrained(Path(path))) if self.rank == 0 else None
