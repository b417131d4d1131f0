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
is on-policy, one version per iteration.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import torch

from actors.learner import Learner
from actors.weight_sync import BucketMeta, FlatParameters, StagingBuffers, put_buckets
from rlhf.collate import LMBatch
from rlhf.config import OptimizerConfig, PPOConfig
from rlhf.ema import EMA
from rlhf.experience import Experience
from rlhf.forward import policy_logits, token_logprobs
from rlhf.losses import policy_loss, ptx_lm_loss, ptx_targets
from rlhf.masked import masked_count, masked_mean
from rlhf.models import load_policy, load_tokenizer


class StaleRolloutError(RuntimeError):
    """A minibatch sampled with weights other than the learner's current version."""


class PolicyLearner(Learner):
    def __init__(self, policy_path: str, ppo: PPOConfig | None = None,
                 optimizer: OptimizerConfig | None = None, seed: int = 0,
                 num_threads: int | None = None, device: str = "auto", dtype: str | None = None,
                 bucket_cap_mb: float = 64.0, forward_batch_size: int = 64) -> None:
        super().__init__(ppo, optimizer, seed, num_threads, device, dtype, bucket_cap_mb, forward_batch_size)
        self.policy_path = str(policy_path)
        self.model = load_policy(policy_path, dtype=self.dtype).to(self.device).eval()
        # The weight broadcast's CPU buffers: on CPU the parameters themselves live in them
        # (nothing to pack; before the optimizer, which must see the final parameters);
        # on a GPU each sync packs a host copy into reused staging buffers.
        if self.device.type == "cpu":
            self.flat: FlatParameters | None = FlatParameters(self.model)
        else:
            self.flat, self.staging = None, StagingBuffers(self.cap_bytes)
        self.start_training(self.ppo.lr)
        self.ema = EMA(self.model, decay=self.ppo.ema_decay)
        self.version = 0

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
        if sampled != self.version:
            raise StaleRolloutError(f"minibatch sampled with weight version {sampled}, learner "
                                    f"{self.rank} is at {self.version}")

    def train_minibatch(self, exp_shard: Experience, ptx_shard: LMBatch | None = None,
                        ptx_coef: float | None = None, version: int | None = None) -> dict[str, float]:
        """One joint PPO(+ptx) optimizer step on this rank's shard; returns this rank's stats.

        The gradient is that of the minibatch-wide token means; the reported loss,
        ptx_loss, entropy, clipfrac, approx_kl and ratio_mean are means over this
        rank's tokens (the driver averages ranks). ppo_grad_norm / ptx_grad_norm:
        norms of what the PPO and the ptx backward passes put into this rank's
        gradient buffers (its share, before the all-reduce); grad_norm: the
        all-reduced gradient the step used (before clipping).
        """
        self._check_version(exp_shard.weight_version, version)
        coef = self.ppo.ptx_coef if ptx_coef is None else float(ptx_coef)
        exp = exp_shard.to(self.device)
        b = ptx_shard.to(self.device) if ptx_shard is not None and len(ptx_shard) else None
        ppo_share, ptx_share = self.global_token_shares(
            masked_count(exp.action_mask), masked_count(ptx_targets(b.loss_mask)) if b is not None else 0)
        self.optimizer.zero_grad(set_to_none=True)

        logp, ent = token_logprobs(self.model, exp.input_ids, exp.attention_mask, with_entropy=True,
                                   temperature=self.ppo.temperature)
        ent = ent.detach()
        loss, stats = policy_loss(logp, exp.old_logprobs, exp.advantages, exp.action_mask,
                                  clip=self.ppo.clip_ratio)
        (loss * ppo_share).backward()  # share 1.0 (exact) on one rank
        ppo_sq = self.grads.capture()

        ptx_loss = float("nan")
        if b is not None:
            with torch.set_grad_enabled(coef != 0.0):
                # T = 1: the ptx loss trains the model as a language model, not the sampler.
                lm = ptx_lm_loss(policy_logits(self.model, b.input_ids, b.attention_mask),
                                 b.input_ids, b.loss_mask)
                if coef != 0.0:
                    (coef * lm * ptx_share).backward()  # accumulates onto the PPO gradient in .grad
            ptx_loss = float(lm.detach())
        # Measured from the buffers themselves: whatever ptx added, and nothing else.
        ptx_sq = self.grads.absorb()

        norm, skipped = self.synced_step(self.grads, self.optimizer, self.opt_cfg.max_grad_norm)
        if not skipped:
            self.ema.update(self.model)
        stats.update(
            loss=float(loss.detach()),
            entropy=float(masked_mean(ent, exp.action_mask)),
            ptx_loss=ptx_loss,
            ppo_grad_norm=math.sqrt(ppo_sq),
            ptx_grad_norm=math.sqrt(ptx_sq),
            **self.step_stats(norm, skipped),
            version=float(self.version),
        )
        return stats

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

    def publish_weights(self) -> tuple[list, list[BucketMeta], int]:
        """CPU transport: each bucket `ray.put` once here; returns (refs, meta, version).

        The driver passes this call's ObjectRef to every generator's `install_published`
        (the same refs for all), and calls `checksum` here while they load.
        """
        buffers, meta = self.weight_buckets()
        return put_buckets(buffers), meta, self.version

    # ------------------------------------------------------------ checkpoints

    def state_dict_for_checkpoint(self) -> dict[str, Any]:
        return self.snapshot(ema=self.ema.state_dict(), version=self.version)

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        extra = self.restore(state)
        self.ema.load_state_dict(extra["ema"])
        self.version = int(extra["version"])

    def save_pretrained(self, path: str, use_ema: bool = True) -> str:
        """An HF directory of the policy (EMA weights by default, as the paper evaluates)."""
        model = copy.deepcopy(self.model).cpu()
        if use_ema:
            self.ema.copy_to(model)
        out = Path(path)
        model.save_pretrained(out, safe_serialization=True)
        if (Path(self.policy_path) / "tokenizer_config.json").exists():
            load_tokenizer(self.policy_path).save_pretrained(out)
        return str(out)
