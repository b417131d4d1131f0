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

Measurement only (synthetic task, `ppo.probe_prompts`): v_k also samples a fixed set of
held-out prompts with a fixed seed, scored by the gold labeler (`heldout_gold_score`).

Faults (issue 6; orchestration/ppo/faults.py): remote calls go through `self.faults`,
so a generator, scorer or critic whose process dies is restarted in place and its
call retried, and a lost learner rank rewinds the run to the last checkpoint.
Skipped non-finite steps are counted; ppo.max_nonfinite_steps in a row stop the run.
Checkpoints hold everything a resumed run needs to repeat the uninterrupted one
exactly: learner and critic state (weights, Adam, schedule, EMA, RNG) and the
driver's data-stream positions; per-iteration seeds derive from (seed, iteration).
"""
from __future__ import annotations

import logging
import random
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from actors import WorkerGroup
from orchestration.ppo import checkpoints
from orchestration.ppo.faults import ActorLost, CallLog, FaultHandler, NonFiniteGuard, gather
from orchestration.ppo.streams import BlockStream, Stream
from orchestration.ppo.team import ActorTeam
from orchestration.ppo.timing import PhaseTimer
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
    probe_prompts: tuple[str, ...] = ()  # held-out prompts for `heldout_gold_score` (needs gold_scorer)


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
        self.nonfinite = NonFiniteGuard(self.p.max_nonfinite_steps)
        self._initial_state = self._driver_state()
        self.critic_calls = CallLog()  # since the last checkpoint, replayed onto a restarted critic
        self.team = ActorTeam(cfg, str(inputs.policy), str(inputs.reward_model))
        t = self.team
        self.faults = FaultHandler(self.p.max_restarts, {
            "generator": t.restart_generator, "reward": lambda _: t.restart_reward(),
            "reference": lambda _: t.restart_reference(),
            "critic": lambda _: t.restart_critics(checkpoints.latest(self.stage, "critic.pt"), self.critic_calls)})

    def _rewind(self, _: int = 0) -> None:
        """After a learner loss: a fresh policy group; it and the critic back at the last checkpoint."""
        self.team.restart_learners()
        if self.stage.latest_checkpoint() is None:  # back to the start: the critic's initial weights
            self.team.restart_critics(None, CallLog())
        self._restore()
        checkpoints.truncate_metrics(self.stage.metrics_file, self.iteration)
        self.sync_weights(rewind=True)

    # ---- the loop -----------------------------------------------------------------
    def run(self, resume: bool = False) -> Path:
        """Iterations from 0 (or the last checkpoint) to the end, then the final (EMA) policy.

        A lost learner rank anywhere in here rewinds the run to the last checkpoint
        (bounded by ppo.max_restarts); other roles restart in place (faults.py).
        """
        try:
            if resume:
                self._restore()
            checkpoints.truncate_metrics(self.stage.metrics_file, self.iteration)
            self.sync_weights()
        except ActorLost as lost:  # a learner rank already: the rewind does the same start
            self.faults.recover(lost, self._rewind)
        total = self.cfg.ppo_iterations
        logger = MetricsLogger(self.stage)
        bar = tqdm(total=total, initial=self.iteration, desc=f"{self.stage.path.name}", unit="it")
        try:
            while True:
                try:
                    if self.iteration == total:
                        return self.save_final()
                    m = self._iterate(logger, total)
                    bar.set_postfix(reward=f"{m['rm_score_mean']:.3f}", kl=f"{m['kl_per_sequence']:.3f}",
                                    gold=f"{m.get('heldout_gold_score', m.get('gold_score', float('nan'))):.3f}",
                                    refresh=False)
                except ActorLost as lost:  # a learner rank (the other roles restart in place)
                    self.faults.recover(lost, self._rewind)
                bar.n = self.iteration
                bar.refresh()
        finally:
            logger.close()
            bar.close()

    def _iterate(self, logger: MetricsLogger, total: int) -> dict:
        metrics = self.step(self.iteration)
        logger.log(self.iteration, **metrics)
        self.iteration += 1
        if self.iteration % self.p.checkpoint_every == 0 or self.iteration == total:
            self.checkpoint()
        self.faults.progress(self.iteration)
        return metrics

    @property
    def phase(self) -> tuple[int, str]:
        """(iteration, phase) now running; phases: generate, probe, score, learn, sync, checkpoint."""
        return self.faults.where

    @contextmanager
    def _phase(self, k: int, name: str):
        self.faults.where = (k, name)
        with self.timer.phase(name):
            yield

    def step(self, k: int) -> dict:
        with self._phase(k, "generate"):
            rollout, gen_stats = self.generate(self.prompts.take(self.p.batch_size), seed=self._seed(k))
        probe = {}
        if self.inputs.probe_prompts and self.inputs.gold_scorer is not None:
            with self._phase(k, "probe"):
                probe = self.probe()
        with self._phase(k, "score"):
            exp, stats = self.score(rollout)
        with self._phase(k, "learn"):
            stats |= self.learn(exp, k)
        with self._phase(k, "sync"):
            self.sync_weights()
        stats |= self.gold(rollout) | probe | self.sync_record | gen_stats | self.faults.metrics()
        seconds = self.timer.pop()
        tokens = int(rollout.attention_mask.sum())
        training_seconds = sum(v for name, v in seconds.items() if name != "seconds_probe")
        stats |= seconds | {
            "iteration": k, "episodes": (k + 1) * self.p.batch_size, "weight_version": rollout.weight_version,
            "tokens_per_second": tokens / max(training_seconds, 1e-9),
            "generated_tokens_per_second": int(rollout.action_mask.sum()) / max(seconds["seconds_generate"], 1e-9),
        }
        return stats

    def generate(self, prompts: list[str], seed: int) -> tuple[Rollout, dict]:
        """Each generator samples its shard with seed + its index; a lost one is restarted,
        re-synced and its shard retried with the same seed."""
        ids = [self.tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        shards = _split_evenly(list(zip(ids, prompts)), len(self.team.generators))
        args = (self.cfg.model.max_response_tokens, self.p.temperature, self.p.top_p)

        def sample(i: int) -> list:
            ids_i, texts_i = [s[0] for s in shards[i]], [s[1] for s in shards[i]]
            return [self.team.generators[i].generate.remote(ids_i, texts_i, *args, seed + i)]

        def passes(i: int) -> list:
            return [self.team.generators[i].generation_passes.remote()]
        busy = [i for i, shard in enumerate(shards) if shard]
        parts = [p.get()[0] for p in [self.faults.submit("generator", partial(sample, i), [i]) for i in busy]]
        asked = [self.faults.submit("generator", partial(passes, i), [i]) for i in busy]
        sizes = [rows * positions for ask in asked for rows, positions in ask.get()[0]]
        return Rollout.concat(parts), {"generation_passes": len(sizes),
                                       "generation_peak_tokens": max(sizes, default=0)}

    def score(self, rollout: Rollout) -> tuple[Experience, dict]:
        """RM, reference, critic and learner forward passes, all in flight at once."""
        ids, mask, team = rollout.input_ids, rollout.attention_mask, self.team
        rm = self.faults.submit("reward", lambda: [team.reward.score.remote(ids, mask)])
        ref = self.faults.submit("reference", lambda: [team.reference.logprobs.remote(ids, mask)])
        old = self.faults.submit("learner", lambda: self._sharded(team.learners, "logprobs", rollout))
        values = self.faults.submit("critic", lambda: self._sharded(team.critics, "values", rollout))
        old_logprobs = torch.cat(old.get())
        values = torch.cat(values.get())
        mask_f = rollout.action_mask.float()
        return build_experience(rollout, old_logprobs * mask_f, ref.get()[0] * mask_f, values, rm.get()[0],
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
                pol, cri = self._train_minibatch(mb, ptx)
                policy_stats += pol
                critic_stats += cri
        team = self.team
        ends = [self.faults.submit("learner", lambda: team.learners.call_all("end_iteration")),
                self.faults.submit("critic", lambda: team.critics.call_all("end_iteration"))]
        for end in ends:
            end.get()
        self.critic_calls.record("end_iteration")
        critic = {k if k.startswith(("value", "vf_")) else f"critic_{k}": v
                  for k, v in _mean_stats(critic_stats).items()}
        out = _mean_stats(policy_stats) | critic
        out["minibatches"] = n_mb * self.p.ppo_epochs
        # Every rank makes the same skip decision: steps skipped = sum over ranks / ranks.
        out["skipped_steps"] = sum(s["skipped"] for s in policy_stats) / len(team.learners)
        out["critic_skipped_steps"] = sum(s["skipped"] for s in critic_stats) / len(team.critics)
        # cumulative counters: the latest value, not a mean over minibatches
        out["nonfinite_steps"] = policy_stats[-1]["nonfinite_steps"]
        out["critic_nonfinite_steps"] = critic_stats[-1]["nonfinite_steps"]
        return out

    def _train_minibatch(self, mb: Experience, ptx) -> tuple[list[dict], list[dict]]:
        """One policy step and one critic step (both groups at once); per-rank stats of each."""
        team, n = self.team, len(self.team.learners)
        ptx_shards = ptx.chunk(n) if ptx is not None else [None] * n
        critic_shards = mb.chunk(len(team.critics))
        pol = self.faults.submit("learner", lambda: team.learners.call_sharded(
            "train_minibatch", mb.chunk(n), ptx_shards, ptx_coef=self.ptx_coef))
        cri = self.faults.submit("critic", lambda: team.critics.call_sharded("train_minibatch", critic_shards))
        pol, cri = pol.get(), cri.get()
        self.critic_calls.record("train_minibatch", critic_shards)
        # every rank made the same skip decision (it follows the all-reduced gradient)
        self.nonfinite.observe("policy", bool(pol[-1]["skipped"]))
        self.nonfinite.observe("critic", bool(cri[-1]["skipped"]))
        return pol, cri

    def sync_weights(self, rewind: bool = False) -> None:
        """Broadcast v_{k+1} to every generator (bucketed, versioned), verified by checksum."""
        self.sync_record = self.faults.retrying(lambda: self.team.weight_sync.sync(rewind=rewind))

    def gold(self, rollout: Rollout) -> dict:
        if self.inputs.gold_scorer is None:
            return {}
        scores = []
        for ids, act, prompt in zip(rollout.input_ids, rollout.action_mask, rollout.prompts):
            response = self.tok.decode(ids[act.bool()].tolist())
            scores.append(self.inputs.gold_scorer(prompt, response))
        return {"gold_score": sum(scores) / len(scores)}

    def probe(self) -> dict:
        """Gold score of the policy that sampled this iteration (v_k) on the same held-out
        prompts with the same seed every iteration, so iterations compare like with like."""
        rollout, _ = self.generate(list(self.inputs.probe_prompts), seed=self._seed(-1))
        return {"heldout_gold_score": self.gold(rollout)["gold_score"]}

    # ---- state --------------------------------------------------------------------
    def _seed(self, k: int) -> int:
        return random.Random(f"{self.cfg.run.seed}:{k}").randrange(2**31)

    @staticmethod
    def _sharded(group: WorkerGroup, method: str, rollout: Rollout) -> list:
        shards = rollout.chunk(len(group))
        return group.call_sharded(method, [s.input_ids for s in shards], [s.attention_mask for s in shards])

    def _driver_state(self) -> dict:
        return {"iteration": self.iteration, "prompts": self.prompts.state_dict(),
                "ptx": self.ptx.state_dict(), "torch_rng": torch.get_rng_state(),
                "nonfinite_in_a_row": self.nonfinite.state_dict()}

    def _load_driver_state(self, state: dict) -> None:
        self.prompts.load_state_dict(state["prompts"])
        self.ptx.load_state_dict(state["ptx"])
        torch.set_rng_state(state["torch_rng"])
        self.nonfinite.load_state_dict(state.get("nonfinite_in_a_row", {}))
        self.iteration = state["iteration"]

    def checkpoint(self) -> Path:
        self.faults.where = (self.iteration, "checkpoint")
        team = self.team
        policy = self.faults.submit("learner", lambda: [team.learners.call_rank0("state_dict_for_checkpoint")])
        critic = self.faults.submit("critic", lambda: [team.critics.call_rank0("state_dict_for_checkpoint")])
        states = {"policy.pt": policy.get()[0], "critic.pt": critic.get()[0], "driver.pt": self._driver_state()}
        path = checkpoints.save(self.stage, self.iteration, states)
        self.critic_calls.clear()  # the checkpoint now holds the critic's state
        return path

    def _restore(self) -> None:
        """The last complete checkpoint into the learner groups and the driver (none: the start)."""
        checkpoints.remove_half_written(self.stage)
        ckpt = self.stage.latest_checkpoint()
        self.critic_calls.clear()
        if ckpt is None:
            log.info("no checkpoint in %s; starting from iteration 0", self.stage.checkpoints)
            self._load_driver_state(self._initial_state)
            return
        states = checkpoints.load(ckpt)
        gather(self.team.learners.call_all("load_checkpoint_state", states["policy.pt"]), "learner")
        self.faults.retrying(lambda: gather(
            self.team.critics.call_all("load_checkpoint_state", states["critic.pt"]), "critic"))
        self._load_driver_state(states["driver.pt"])
        log.info("resumed %s at iteration %d from %s", self.stage.path.name, self.iteration, ckpt)

    def save_final(self) -> Path:
        def write(tmp: Path) -> None:
            gather([self.team.learners.call_rank0("save_pretrained", str(tmp), use_ema=True)], "learner")
        return self.stage.save_final(write)

    def shutdown(self) -> None:
        self.team.shutdown()


def _split_evenly(items: list, parts: int) -> list[list]:
    bounds = [round(i * len(items) / parts) for i in range(parts + 1)]
    return [items[bounds[i]: bounds[i + 1]] for i in range(parts)]


def _mean_stats(rows: list[dict]) -> dict:
    keys = {k for r in rows for k, v in r.items() if isinstance(v, (int, float))}
    return {k: sum(r[k] for r in rows if k in r) / sum(1 for r in rows if k in r) for k in keys}
