"""PolicyLearner: one rank of the policy group; PPO-ptx updates as in the paper.

Per minibatch: PPO clipped loss backward, then the ptx LM loss x gamma
backward into the SAME .grad buffers (one joint gradient, not a second step),
all-reduce over the group in a few flat buckets, non-finite check, optional
clipping, ONE Adam step, EMA update. Both losses are means over the tokens of
the whole minibatch (all ranks), so the number of learners does not change the
update. Dropout stays off and logprobs are taken at the sampler's temperature
(`ppo.temperature`): the PPO ratio must be exactly 1 before the first step, and
old logprobs are recomputed here.

Versions: the learner starts at 0 (the weights at `policy_path`, which the
generators also load) and `end_iteration` bumps it after an iteration's steps.
A minibatch sampled with another version is refused (StaleRolloutError): PPO here
is on-policy, one version per iteration; with `ppo.async_rollouts` a minibatch may be
up to `ppo.max_staleness` versions old (and carries its behaviour weights), no more.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import torch

from actors.learner import Learner
from actors.weight_sync import (BucketMeta, FlatParameters, StagingBuffers, gathered_buckets, plan_buckets,
                                put_buckets)
from rlhf import sharding
from rlhf.collate import LMBatch
from rlhf.config import OptimizerConfig, PPOConfig
from rlhf.ema import EMA
from rlhf.experience import Experience
from rlhf.forward import policy_logits, token_logprobs
from rlhf.losses import policy_loss, ptx_lm_loss, ptx_targets
from rlhf.masked import masked_count, masked_mean
from rlhf.models import load_policy, load_tokenizer
from rlhf.sharding import TrainLayout


class StaleRolloutError(RuntimeError):
    """A minibatch sampled with weights other than the learner's current version."""


class PolicyLearner(Learner):
    def __init__(self, policy_path: str, ppo: PPOConfig | None = None,
                 optimizer: OptimizerConfig | None = None, seed: int = 0,
                 num_threads: int | None = None, device: str = "auto", layout: TrainLayout | None = None,
                 bucket_cap_mb: float = 64.0, forward_batch_size: int = 64) -> None:
        super().__init__(ppo, optimizer, seed, num_threads, device, layout, bucket_cap_mb, forward_batch_size)
        self.policy_path = str(policy_path)
        self.lr = self.ppo.lr
        self.model = load_policy(policy_path, dtype=torch.float32).to(self.device).eval()
        self.version = 0
        self.begin()

    def before_optimizer(self) -> None:
        # The weight broadcast's CPU buffers: for a CPU replica the parameters themselves
        # live in them (nothing to pack; before the optimizer, which must see the final
        # parameters); on a GPU, or sharded, each sync packs into reused staging buffers.
        if self.device.type == "cpu" and not self.layout.sharded:
            self.flat: FlatParameters | None = FlatParameters(self.model)
        else:
            self.flat, self.staging = None, StagingBuffers(self.cap_bytes)

    def after_optimizer(self) -> None:
        self.ema = EMA(self.model, decay=self.ppo.ema_decay)

    # ------------------------------------------------------------ scoring

    def logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, T] log pi(token_t | <t) under the current weights at the sampler's temperature
        (the old logprobs); float32 (float64 for a float64 model)."""
        t = self.ppo.temperature
        return self.forward_in_batches(lambda i, m: token_logprobs(self.model, i, m, temperature=t),
                                       input_ids, attention_mask)

    # ------------------------------------------------------------ training

    def _check_version(self, sampled: int, expected: int | None) -> None:
        if expected is not None and expected != self.version:
            raise StaleRolloutError(f"driver expects learner version {expected}, "
                                    f"learner {self.rank} is at {self.version}")
        bound = self.ppo.max_staleness if self.ppo.async_rollouts else 0
        if not 0 <= self.version - sampled <= bound:
            raise StaleRolloutError(f"minibatch sampled with weight version {sampled}, learner "
                                    f"{self.rank} is at {self.version} (at most {bound} versions behind)")

    def train_minibatch(self, exp_shard: Experience, ptx_shard: LMBatch | None = None,
                        ptx_coef: float | None = None, version: int | None = None) -> dict[str, float]:
        """One joint PPO(+ptx) optimizer step on this rank's shard; returns this rank's stats.

        The gradient is that of the minibatch-wide token means, whether the shard goes
        through in one forward/backward or in `ppo.micro_batch_size` pieces (each piece's
        mean weighted by its share of the minibatch's tokens). The reported loss,
        ptx_loss, entropy, clipfrac, approx_kl and ratio_mean are means over this rank's
        tokens (the driver averages ranks). ppo_grad_norm / ptx_grad_norm: norms of what
        the PPO and the ptx backward passes put into the gradient (this rank's share,
        before the all-reduce; under fsdp the group's, already averaged); grad_norm: the
        averaged gradient the step used (before clipping).
        """
        self._require_started()
        self._check_version(exp_shard.weight_version, version)
        coef = self.ppo.ptx_coef if ptx_coef is None else float(ptx_coef)
        exp = exp_shard.to(self.device)
        b = ptx_shard.to(self.device) if ptx_shard is not None else None  # may be empty on this rank
        n_ppo, n_ptx = masked_count(exp.action_mask), masked_count(ptx_targets(b.loss_mask)) if b is not None else 0
        ppo_share, ptx_share = self.global_token_shares(n_ppo, n_ptx)
        pieces = self.micro_batches(len(exp))
        self.optimizer.zero_grad(set_to_none=True)
        t = self.ppo.temperature

        # PPO: every piece's clipped loss backward; stats weighted by the piece's tokens.
        sums: dict[str, float] = {}
        for part in exp.chunk(pieces):
            if not len(part):  # a rank with fewer episodes than the group's busiest
                self.idle_pass(lambda i, m: token_logprobs(self.model, i, m, temperature=t), backward=True)
                continue
            with self.compute():
                logp, ent = token_logprobs(self.model, part.input_ids, part.attention_mask, with_entropy=True,
                                           temperature=t)
            loss, stats = policy_loss(logp, part.old_logprobs, part.advantages, part.action_mask,
                                      clip=self.ppo.clip_ratio, weights=part.behaviour_weights)
            w = masked_count(part.action_mask) / n_ppo if n_ppo else 1.0 / pieces
            self.backward(loss * ppo_share * w)  # share 1.0 and w 1.0 (exact) on one rank, one piece
            stats.update(loss=float(loss.detach()), entropy=float(masked_mean(ent.detach(), part.action_mask)))
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + w * v
        self.grads.capture()
        ppo_sq = self.grads.sq_norm()

        ptx_loss = float("nan")
        ptx_mb = self.ppo.ptx_micro_batch_size  # None: the ptx rows split into the episodes' pieces
        if b is not None:
            ptx_pieces = self.micro_batches(len(b), ptx_mb) if ptx_mb else pieces
            lm_sum = 0.0
            for part in b.chunk(ptx_pieces):
                if not len(part):  # as for the episodes
                    self.idle_pass(lambda i, m: policy_logits(self.model, i, m), backward=coef != 0.0)
                    continue
                with torch.set_grad_enabled(coef != 0.0), self.compute():
                    # T = 1: the ptx loss trains the model as a language model, not the sampler.
                    lm = ptx_lm_loss(policy_logits(self.model, part.input_ids, part.attention_mask),
                                     part.input_ids, part.loss_mask)
                w = masked_count(ptx_targets(part.loss_mask)) / n_ptx if n_ptx else 1.0 / ptx_pieces
                if coef != 0.0:
                    self.backward(coef * lm * ptx_share * w)  # accumulates onto the PPO gradient in .grad
                lm_sum += w * float(lm.detach())
            ptx_loss = lm_sum if len(b) else float("nan")
        # Measured from the buffers themselves: whatever ptx added, and nothing else.
        ptx_sq = self.grads.absorb() if b is not None and coef != 0.0 else 0.0

        norm, skipped = self.synced_step(self.grads, self.optimizer, self.opt_cfg.max_grad_norm, self.scaler)
        if not skipped:
            self.ema.update(self.model)
        loss_scale = self.scaler.scale if self.scaler.enabled else 1.0
        return sums | dict(
            ptx_loss=ptx_loss,
            ppo_grad_norm=math.sqrt(ppo_sq) / loss_scale,
            ptx_grad_norm=math.sqrt(ptx_sq) / loss_scale,
            **self.step_stats(norm, skipped),
            version=float(self.version),
        )

    def end_iteration(self) -> int:
        """After an iteration's minibatches: advance the LR schedule and the weight version."""
        self.scheduler.step()
        self.version += 1
        return self.version

    # ------------------------------------------------------------ weights out

    def weight_version(self) -> int:
        return self.version

    def weight_buckets(self) -> tuple[list[torch.Tensor], list[BucketMeta]]:
        """Current (not EMA) weights as a few flat CPU buffers and their layout."""
        if self.flat is not None:
            return self.flat.buckets(self.model)
        return self.staging.pack(self.model.named_parameters())

    def publish_weights(self) -> tuple[list, list[BucketMeta], int] | None:
        """CPU transport: each bucket `ray.put` once; returns (refs, meta, version) on rank 0.

        The driver passes rank 0's ObjectRef to every generator's `install_published`
        (the same refs for all), and calls `checksum` while they load. Sharded, every
        rank takes part: the full weights are gathered one bucket at a time, put, and
        dropped, so a rank holds at most one bucket beyond its shard.
        """
        if self.layout.sharded:
            refs, metas = [], plan_buckets(list(self.model.named_parameters()), self.cap_bytes)
            for bucket, meta in gathered_buckets(self.model.named_parameters(), metas):
                if self.rank == 0:
                    refs += put_buckets([bucket])
                del bucket
            return (refs, metas, self.version) if self.rank == 0 else None
        if self.rank != 0:
            return None
        buffers, meta = self.weight_buckets()
        return put_buckets(buffers), meta, self.version

    # ------------------------------------------------------------ checkpoints

    def state_dict_for_checkpoint(self) -> dict[str, Any]:
        return self.snapshot(ema=self.ema.state_dict(), version=self.version)

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        extra = self.restore(state)
        self.ema.load_state_dict(extra["ema"])
        self.version = int(extra["version"])

    def sharded_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"ema": self.ema.shadow}

    def plain_state(self) -> dict[str, Any]:
        return super().plain_state() | {"version": self.version, "ema_updates": self.ema.num_updates,
                                        "ema_buffers": self.ema.buffers}

    def load_plain_state(self, state: dict[str, Any]) -> dict[str, Any]:
        super().load_plain_state(state)
        self.version = int(state["version"])
        self.ema.num_updates = int(state["ema_updates"])
        self.ema.buffers = dict(state["ema_buffers"])
        return state

    def full_ema(self) -> dict[str, torch.Tensor]:
        """Whole CPU copies of the EMA weights (a collective when sharded)."""
        return {n: t.cpu().clone() for n, t in sharding.full_named_tensors(iter(self.ema.shadow.items()))}

    def save_pretrained(self, path: str, use_ema: bool = True) -> str | None:
        """An HF directory of the policy (EMA weights by default, as the paper evaluates).

        Sharded, every rank gathers the weights (a collective) and rank 0 writes them into
        a fresh unsharded copy of the model; other ranks return None.
        """
        if self.layout.sharded:
            source = self.ema.shadow if use_ema else dict(self.model.named_parameters())
            weights = sharding.gather_to_rank0(iter(source.items()))
            if self.rank != 0:
                return None
            model = load_policy(self.policy_path, dtype=torch.float32)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.copy_(weights[name])
        else:
            if self.rank != 0:
                return None
            model = copy.deepcopy(self.model).cpu()
            if use_ema:
                self.ema.copy_to(model)
        out = Path(path)
        model.save_pretrained(out, safe_serialization=True)
        if (Path(self.policy_path) / "tokenizer_config.json").exists():
            load_tokenizer(self.policy_path).save_pretrained(out)
        return str(out)
