"""The PPO-ptx iteration (DESIGN §3), one controller over actor groups by role.

    for each iteration k:
        prompts   <- next 512 prompts
        rollouts  <- generators sample at T=1 with policy weights v_k
        scores    <- in parallel: RM score, reference logprobs, critic values,
                     learner logprobs (recomputed; the sampler's are only compared)
        rewards   <- -beta * KL per token, + RM score on the last token; GAE; whiten
        for each of the 8 minibatches of 64 (1 epoch):
            policy:  PPO clipped loss backward, then gamma_ptx * LM loss on
                     8x pretraining rows backward, one optimizer step, EMA
            critic:  clipped value loss step
        broadcast v_{k+1} to every generator; verify checksums
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import ray
import torch
from tqdm import tqdm

from actors import (CriticLearner, PolicyLearner, ReferenceScorer, RewardScorer, RolloutGenerator,
                    WorkerGroup, actor_class)
from orchestration.cluster import cpu_share
from orchestration.ppo.streams import BlockStream, Stream
from orchestration.ppo.timing import PhaseTimer
from orchestration.ppo.weight_sync import make_sync
from orchestration.rundir import MetricsLogger, StageDir
from rlhf.collate import lm_batch
from rlhf.config import Config
from rlhf.experience import Experience, Rollout, build_experience

log = logging.getLogger(__name__)


@dataclass
class PPOInputs:
    policy: Path          # PPO-init SFT: the starting policy and the KL reference
    reward_model: Path    # also the value model's initialisation
    tokenizer: object
    prompts: list[str]
    ptx_blocks: torch.Tensor  # [N, L] packed pretraining text
    gold_scorer: object = None  # callable(prompt, response) -> [0,1] for the synthetic task


class PPOTrainer:
    def __init__(self, cfg: Config, stage: StageDir, inputs: PPOInputs, ptx_coef: float):
        self.cfg, self.p, self.stage, self.inputs = cfg, cfg.ppo, stage, inputs
        self.ptx_coef = ptx_coef
        self.tok = inputs.tokenizer
        seed = cfg.run.seed
        self.prompts = Stream(inputs.prompts, seed=seed)
        self.ptx = BlockStream(inputs.ptx_blocks, seed=seed + 1)
        self.timer = PhaseTimer()
        self.iteration = 0
        self._start_actors()

    # ---- actors -------------------------------------------------------------------
    def _start_actors(self) -> None:
        p, device, seed = self.p, self.cfg.run.device, self.cfg.run.seed
        cpus = cpu_share(p.num_generators + 2 * p.num_learners + 2)
        gpu = 1.0 if self.cfg.resources.num_gpus > 0 else 0.0
        common = {"num_threads": 1, "device": device}
        self.generators = [
            actor_class(RolloutGenerator, cpus, gpu * self.cfg.resources.gpus_per_generator).remote(
                str(self.inputs.policy), engine=p.engine, seed=seed + i, **common,
                engine_kwargs={"token_budget": p.generation_token_budget})
            for i in range(p.num_generators)]
        self.reward = actor_class(RewardScorer, cpus, gpu).remote(str(self.inputs.reward_model), **common)
        self.reference = actor_class(ReferenceScorer, cpus, gpu).remote(str(self.inputs.policy), **common)
        learner_kw = {"ppo": p, "optimizer": self.cfg.optimizer, "seed": seed, **common}
        self.learners = WorkerGroup(PolicyLearner, p.num_learners, str(self.inputs.policy),
                                    num_cpus=cpus, num_gpus=gpu, **learner_kw)
        self.critics = WorkerGroup(CriticLearner, p.num_learners, str(self.inputs.reward_model),
                                   num_cpus=cpus, num_gpus=gpu, **learner_kw)
        self.weight_sync = make_sync(p.engine, self.learners, self.generators)

    # ---- the loop -----------------------------------------------------------------
    def run(self, resume: bool = False) -> Path:
        if resume:
            self._restore()
        _truncate_metrics(self.stage.metrics_file, self.iteration)
        self.sync_weights()
        total = self.cfg.ppo_iterations
        logger = MetricsLogger(self.stage)
        bar = tqdm(range(self.iteration, total), initial=self.iteration, total=total,
                   desc=f"{self.stage.path.name}", unit="it")
        for k in bar:
            metrics = self.step(k)
            logger.log(k, **metrics)
            bar.set_postfix(reward=f"{metrics['rm_score_mean']:.3f}", kl=f"{metrics['kl_per_sequence']:.3f}",
                            gold=f"{metrics.get('gold_score', float('nan')):.3f}")
            self.iteration = k + 1
            if self.iteration % self.p.checkpoint_every == 0 or self.iteration == total:
                self.checkpoint()
        logger.close()
        return self.save_final()

    def step(self, k: int) -> dict:
        with self.timer.phase("generate"):
            rollout = self.generate(self.prompts.take(self.p.batch_size), seed=self._seed(k))
        with self.timer.phase("score"):
            exp, stats = self.score(rollout)
        with self.timer.phase("learn"):
            stats |= self.learn(exp, k)
        with self.timer.phase("sync"):
            self.sync_weights()
        stats |= self.gold(rollout) | self.sync_record
        seconds = self.timer.pop()
        tokens = int(rollout.attention_mask.sum())
        stats |= seconds | {
            "iteration": k, "episodes": (k + 1) * self.p.batch_size, "weight_version": rollout.weight_version,
            "tokens_per_second": tokens / max(sum(seconds.values()), 1e-9),
            "generated_tokens_per_second": int(rollout.action_mask.sum()) / max(seconds["seconds_generate"], 1e-9),
        }
        return stats

    def generate(self, prompts: list[str], seed: int) -> Rollout:
        ids = [self.tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        shards = _split_evenly(list(zip(ids, prompts)), len(self.generators))
        futures = [g.generate.remote([s[0] for s in shard], [s[1] for s in shard],
                                     self.cfg.model.max_response_tokens, self.p.temperature,
                                     self.p.top_p, seed + i)
                   for i, (g, shard) in enumerate(zip(self.generators, shards)) if shard]
        return Rollout.concat(ray.get(futures))

    def score(self, rollout: Rollout) -> tuple[Experience, dict]:
        """RM, reference, critic and learner forward passes, all in flight at once."""
        ids, mask = rollout.input_ids, rollout.attention_mask
        rm = self.reward.score.remote(ids, mask)
        ref = self.reference.logprobs.remote(ids, mask)
        old = self._sharded(self.learners, "logprobs", rollout)
        values = self._sharded(self.critics, "values", rollout)
        old_logprobs = torch.cat(ray.get(old))
        values = torch.cat(ray.get(values))
        mask_f = rollout.action_mask.float()
        return build_experience(rollout, old_logprobs * mask_f, ray.get(ref) * mask_f, values, ray.get(rm),
                                self.p.kl_coef, self.p.gamma, self.p.lam)

    def learn(self, exp: Experience, k: int) -> dict:
        """One epoch (paper: 1) over shuffled minibatches; policy and critic step together."""
        n_mb = self.p.batch_size // self.p.minibatch_size
        order = torch.randperm(len(exp), generator=torch.Generator().manual_seed(self._seed(k)))
        policy_stats, critic_stats = [], []
        for _ in range(self.p.ppo_epochs):
            for mb in exp.select(order).split(self.p.minibatch_size):
                ptx = (lm_batch(self.ptx.take_blocks(len(mb) * self.p.ptx_ratio))
                       if self.ptx_coef > 0 and self.p.ptx_ratio > 0 else None)
                n = len(self.learners)
                ptx_shards = ptx.chunk(n) if ptx is not None else [None] * n
                pol = self.learners.call_sharded("train_minibatch", mb.chunk(n), ptx_shards,
                                                 ptx_coef=self.ptx_coef)
                cri = self.critics.call_sharded("train_minibatch", mb.chunk(len(self.critics)))
                policy_stats += ray.get(pol)
                critic_stats += ray.get(cri)
        ray.get(self.learners.call_all("end_iteration") + self.critics.call_all("end_iteration"))
        critic = {k if k.startswith(("value", "vf_")) else f"critic_{k}": v
                  for k, v in _mean_stats(critic_stats).items()}
        out = _mean_stats(policy_stats) | critic
        out["minibatches"] = n_mb * self.p.ppo_epochs
        return out

    def sync_weights(self) -> None:
        """Broadcast v_{k+1} to every generator (bucketed, versioned), verified by checksum."""
        self.sync_record = self.weight_sync.sync()

    def gold(self, rollout: Rollout) -> dict:
        if self.inputs.gold_scorer is None:
            return {}
        scores = []
        for ids, act, prompt in zip(rollout.input_ids, rollout.action_mask, rollout.prompts):
            response = self.tok.decode(ids[act.bool()].tolist())
            scores.append(self.inputs.gold_scorer(prompt, response))
        return {"gold_score": sum(scores) / len(scores)}

    # ---- state --------------------------------------------------------------------
    def _seed(self, k: int) -> int:
        return random.Random(f"{self.cfg.run.seed}:{k}").randrange(2**31)

    @staticmethod
    def _sharded(group: WorkerGroup, method: str, rollout: Rollout) -> list:
        shards = rollout.chunk(len(group))
        return group.call_sharded(method, [s.input_ids for s in shards], [s.attention_mask for s in shards])

    def checkpoint(self) -> Path:
        def write(tmp: Path) -> None:
            torch.save(ray.get(self.learners.call_rank0("state_dict_for_checkpoint")), tmp / "policy.pt")
            torch.save(ray.get(self.critics.call_rank0("state_dict_for_checkpoint")), tmp / "critic.pt")
            torch.save({"iteration": self.iteration, "prompts": self.prompts.state_dict(),
                        "ptx": self.ptx.state_dict(), "torch_rng": torch.get_rng_state()},
                       tmp / "driver.pt")
        return self.stage.save_checkpoint(self.iteration, write)

    def _restore(self) -> None:
        ckpt = self.stage.latest_checkpoint()
        if ckpt is None:
            log.info("no checkpoint in %s; starting from iteration 0", self.stage.checkpoints)
            return
        state = torch.load(ckpt / "driver.pt", weights_only=True)
        policy = torch.load(ckpt / "policy.pt", weights_only=True)
        critic = torch.load(ckpt / "critic.pt", weights_only=True)
        ray.get(self.learners.call_all("load_checkpoint_state", policy)
                + self.critics.call_all("load_checkpoint_state", critic))
        self.prompts.load_state_dict(state["prompts"])
        self.ptx.load_state_dict(state["ptx"])
        torch.set_rng_state(state["torch_rng"])
        self.iteration = state["iteration"]
        log.info("resumed %s at iteration %d from %s", self.stage.path.name, self.iteration, ckpt)

    def save_final(self) -> Path:
        def write(tmp: Path) -> None:
            ray.get(self.learners.call_rank0("save_pretrained", str(tmp), use_ema=True))
        return self.stage.save_final(write)

    def shutdown(self) -> None:
        for a in [*self.generators, self.reward, self.reference]:
            ray.kill(a)
        self.learners.shutdown()
        self.critics.shutdown()


def _split_evenly(items: list, parts: int) -> list[list]:
    bounds = [round(i * len(items) / parts) for i in range(parts + 1)]
    return [items[bounds[i]: bounds[i + 1]] for i in range(parts)]


def _mean_stats(rows: list[dict]) -> dict:
    keys = {k for r in rows for k, v in r.items() if isinstance(v, (int, float))}
    return {k: sum(r[k] for r in rows if k in r) / sum(1 for r in rows if k in r) for k in keys}


def _truncate_metrics(path: Path, iteration: int) -> None:
    """Drop metric rows of iterations a resumed run will redo."""
    import json
    if path.exists():
        rows = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] < iteration]
        path.write_text("".join(r + "\n" for r in rows))
