"""The PPO-ptx iteration: one controller over the actor team, role by role.

    for each iteration k:
        rollouts  <- generators sample the next batch of prompts at temperature T with weights v_k
        scores    <- at once: RM score, reference logprobs, critic values, learner logprobs
                     (recomputed; the sampler's are not trusted)
        rewards   <- -beta * KL per token, + RM score on the last token; GAE; whitened advantages
        for each epoch, for each shuffled minibatch:
            policy:  PPO clipped loss backward, then gamma_ptx * LM loss on ptx_ratio x
                     pretraining rows backward, ONE optimizer step, EMA
            critic:  clipped value loss step
        broadcast v_{k+1} to every generator; checksums compared

With `ppo.async_rollouts` the rollout of iteration k was sampled ahead, with weights up to
`ppo.max_staleness` versions old, while the learners trained on earlier batches
(orchestration/ppo/ahead.py); the policy loss then weighs each token by
min(pi_old / pi_sampler, cap), the decoupled PPO objective (rlhf/off_policy.py).

Who does the work, and what happens when an actor dies, is the team's business
(orchestration/ppo/team.py); measurement is the observer's (observer.py).
Checkpoints hold everything a resumed run needs to repeat the uninterrupted one
exactly: learner and critic state and the driver's data-stream positions; every
random choice derives from (run seed, purpose, iteration).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from orchestration.ppo import checkpoints
from orchestration.ppo.ahead import EMPTY, RolloutsAhead
from orchestration.ppo.faults import ActorLost, NonFiniteGuard
from orchestration.ppo.observer import Observer
from orchestration.ppo.streams import BlockStream, Stream
from orchestration.ppo.team import ActorTeam
from orchestration.rundir import MetricsLogger, StageDir, truncate_metrics
from rlhf.collate import lm_batch
from rlhf.config import Config
from rlhf.experience import Experience, Rollout, build_experience
from rlhf.seeds import derive_seed

log = logging.getLogger(__name__)


@dataclass
class PPOInputs:
    policy: Path          # PPO-init SFT: the starting policy and the KL reference
    reward_model: Path    # also the value model's initialisation
    tokenizer: object
    prompts: list[str]
    ptx_blocks: torch.Tensor  # [N, L] packed pretraining text
    gold_scorer: object = None  # callable(prompt, response) -> [0,1] for the synthetic task
    probe_prompts: tuple[str, ...] = ()  # held-out prompts for `heldout_gold_score` (needs gold_scorer)


class PPOTrainer:
    def __init__(self, cfg: Config, stage: StageDir, inputs: PPOInputs, ptx_coef: float):
        self.cfg, self.p, self.stage, self.ptx_coef = cfg, cfg.ppo, stage, ptx_coef
        self.seed = cfg.run.seed
        self.prompts = Stream(inputs.prompts, seed=derive_seed(self.seed, "prompts"))
        self.ptx = BlockStream(inputs.ptx_blocks, seed=derive_seed(self.seed, "ptx"))
        self.iteration = 0
        self.nonfinite = NonFiniteGuard(self.p.max_nonfinite_steps)
        self.ahead: RolloutsAhead | None = None
        self._initial_state = self._driver_state()
        self.team = ActorTeam(cfg, stage, str(inputs.policy), str(inputs.reward_model), inputs.tokenizer)
        if self.p.async_rollouts:  # batches sampled while the learners train (orchestration/ppo/ahead.py)
            self.ahead = RolloutsAhead(self.team, lambda: self.prompts.take(self.p.batch_size), self.seed,
                                       self.p.max_staleness, cfg.ppo_iterations)
        self.observer = Observer(self.team, inputs.tokenizer, self.seed, self.p.batch_size,
                                 inputs.gold_scorer, inputs.probe_prompts)

    # ---- the algorithm --------------------------------------------------------------
    def step(self, k: int) -> dict:
        """One PPO-ptx iteration; returns its metrics row."""
        team, watch = self.team, self.observer
        with watch.phase(k, "generate"):  # async: only the wait for a batch sampled while learning
            rollout = self._rollout(k)
        watch.probe(k, install=self.ahead.published.ref if self.ahead is not None else None)
        team.generators.sleep()  # colocated: their GPU memory is the learners' until the sync
        with watch.phase(k, "score"):
            exp, stats = self.score(rollout, k)
        with watch.phase(k, "learn"):
            stats |= self.learn(exp, k)
        if self.ahead is None:
            with watch.phase(k, "sync"):
                team.generators.wake(["weights"])  # no KV cache beside the incoming weights
                team.sync()
                team.generators.wake()
        return watch.record(k, rollout, stats)

    def _rollout(self, k: int) -> Rollout:
        """Sampled now with v_k, or (async) taken from the batches sampled ahead, the next
        ones launched with v_k before the learners start on this one."""
        if self.ahead is None:
            return self.team.generators.sample(self.prompts.take(self.p.batch_size),
                                               seed=derive_seed(self.seed, "rollout", k))
        rollout, self.team.last_sync = self.ahead.take(k)
        self.ahead.fill(k)
        return rollout

    def score(self, rollout: Rollout, k: int) -> tuple[Experience, dict]:
        """RM, reference, critic and learner forward passes, all in flight at once."""
        team = self.team
        rm, ref = team.reward(rollout), team.reference(rollout)
        old, values = team.learners.logprobs(rollout), team.critics.values(rollout)
        mask = rollout.action_mask.float()
        staleness = k - rollout.weight_version  # the learners are at v_k
        exp, stats = build_experience(rollout, old.result() * mask, ref.result() * mask, values.result(),
                                      rm.result(), self.p.kl_coef, self.p.gamma, self.p.lam,
                                      behaviour_weight_cap=self.p.behaviour_weight_cap if staleness else None)
        return exp, stats | {"rollout_staleness": staleness}

    def learn(self, exp: Experience, k: int) -> dict:
        """ppo_epochs passes over shuffled minibatches; policy and critic step together."""
        team, p = self.team, self.p
        order = torch.randperm(len(exp), generator=torch.Generator().manual_seed(
            derive_seed(self.seed, "minibatch order", k)))
        policy_stats, critic_stats = [], []
        for _ in range(p.ppo_epochs):
            for mb in exp.select(order).split(p.minibatch_size):
                ptx = (lm_batch(self.ptx.take_blocks(len(mb) * p.ptx_ratio))
                       if self.ptx_coef > 0 and p.ptx_ratio > 0 else None)
                policy, critic = team.learners.train(mb, ptx, self.ptx_coef), team.critics.train(mb)
                policy_stats += policy.result()
                critic_stats += critic.result()
                # every rank made the same skip decision (it follows the all-reduced gradient)
                self.nonfinite.observe("policy", bool(policy_stats[-1]["skipped"]))
                self.nonfinite.observe("critic", bool(critic_stats[-1]["skipped"]))
        ends = [team.learners.end_iteration(), team.critics.end_iteration()]  # LR schedule, version
        for end in ends:
            end.result()
        return update_stats(policy_stats, critic_stats, len(team.learners), len(team.critics),
                            minibatches=p.batch_size // p.minibatch_size * p.ppo_epochs)

    # ---- the run --------------------------------------------------------------------
    def run(self, resume: bool = False) -> Path:
        """Iterations from 0 (or the last checkpoint) to the end, then the final (EMA) policy.

        A lost learner rank anywhere in here rewinds the run to the last checkpoint;
        other roles restart in place inside the team.
        """
        try:
            if resume:
                self._restore()
            truncate_metrics(self.stage.metrics_file, self.iteration)
            self.team.sync()
        except ActorLost as lost:  # a learner rank already: the rewind does the same start
            self._rewound(lost)
        total = self.cfg.ppo_iterations
        logger = MetricsLogger(self.stage, cfg=self.cfg)
        bar = tqdm(total=total, initial=self.iteration, desc=f"{self.stage.path.name}", unit="it")
        try:
            while True:
                try:
                    if self.iteration == total:
                        return self.save_final()
                    m = self.step(self.iteration)
                    logger.log(self.iteration, **m)
                    self.iteration += 1
                    if self.iteration % self.p.checkpoint_every == 0 or self.iteration == total:
                        self.checkpoint()
                    self.team.completed(self.iteration)
                    bar.set_postfix(reward=f"{m['rm_score_mean']:.3f}", kl=f"{m['kl_per_sequence']:.3f}",
                                    gold=f"{m.get('heldout_gold_score', m.get('gold_score', float('nan'))):.3f}",
                                    refresh=False)
                except ActorLost as lost:  # a learner rank (the other roles restart in place)
                    self._rewound(lost)
                bar.n = self.iteration
                bar.refresh()
        finally:
            logger.close()
            bar.close()

    @property
    def phase(self) -> tuple[int, str]:
        return self.observer.where

    def _rewound(self, lost: ActorLost) -> None:
        ckpt = self.team.rewind(lost)
        self._load_driver_state(ckpt.driver if ckpt is not None else self._initial_state)
        truncate_metrics(self.stage.metrics_file, self.iteration)

    # ---- state ----------------------------------------------------------------------
    def checkpoint(self) -> Path:
        self.observer.at(self.iteration, "checkpoint")
        path = checkpoints.save(self.stage, self.iteration, self.team.save_checkpoint, self._driver_state())
        self.team.checkpointed()
        return path

    def _restore(self) -> None:
        """The last complete checkpoint into the learner groups and the driver (none: the start)."""
        ckpt = checkpoints.load_latest(self.stage)
        if ckpt is None:
            log.info("no checkpoint in %s; starting from iteration 0", self.stage.checkpoints)
            self._load_driver_state(self._initial_state)
            return
        self.team.load(ckpt.folder)
        self._load_driver_state(ckpt.driver)
        log.info("resumed %s at iteration %d", self.stage.path.name, self.iteration)

    def _driver_state(self) -> dict:
        ahead = self.ahead.state_dict() if self.ahead is not None else EMPTY
        return {"iteration": self.iteration, "ahead": ahead, "prompts": self.prompts.state_dict(),
                "ptx": self.ptx.state_dict(), "torch_rng": torch.get_rng_state(),
                "nonfinite_in_a_row": self.nonfinite.state_dict()}

    def _load_driver_state(self, state: dict) -> None:
        self.prompts.load_state_dict(state["prompts"])
        self.ptx.load_state_dict(state["ptx"])
        torch.set_rng_state(state["torch_rng"])
        self.nonfinite.load_state_dict(state.get("nonfinite_in_a_row", {}))
        if self.ahead is not None:
            self.ahead.load_state_dict(state.get("ahead", EMPTY))
        self.iteration = state["iteration"]

    def save_final(self) -> Path:
        return self.stage.save_final(self.team.learners.save_final)

    def shutdown(self) -> None:
        self.team.shutdown()


def update_stats(policy: list[dict], critic: list[dict], n_learners: int, n_critics: int,
                 minibatches: int) -> dict:
    """One iteration's per-rank, per-minibatch stats as the metrics row reports them."""
    out = _mean(policy) | {k if k.startswith(("value", "vf_")) else f"critic_{k}": v
                           for k, v in _mean(critic).items()}
    out["minibatches"] = minibatches
    # Every rank makes the same skip decision: steps skipped = sum over ranks / ranks.
    out["skipped_steps"] = sum(s["skipped"] for s in policy) / n_learners
    out["critic_skipped_steps"] = sum(s["skipped"] for s in critic) / n_critics
    # cumulative counters: the latest value, not a mean over minibatches
    out["nonfinite_steps"] = policy[-1]["nonfinite_steps"]
    out["critic_nonfinite_steps"] = critic[-1]["nonfinite_steps"]
    return out


def _mean(rows: list[dict]) -> dict:
    keys = {k for r in rows for k, v in r.items() if isinstance(v, (int, float))}
    return {k: sum(r[k] for r in rows if k in r) / sum(1 for r in rows if k in r) for k in keys}
