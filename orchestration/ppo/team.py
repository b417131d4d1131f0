"""The actors of one PPO run, by role, and how each is started again after a loss.

Generators, the reward and reference scorers are single actors; the policy and
critic learners are `WorkerGroup`s (one gloo/NCCL group each). What a restart
restores is described in `orchestration.ppo.faults`; this file only builds.
"""
from __future__ import annotations

import ray

from actors import (CriticLearner, PolicyLearner, ReferenceScorer, RewardScorer, RolloutGenerator,
                    WorkerGroup, actor_class)
from orchestration.cluster import cpu_share
from orchestration.ppo.faults import CallLog, gather
from orchestration.ppo.weight_sync import make_sync
from rlhf.config import Config


class ActorTeam:
    def __init__(self, cfg: Config, policy: str, reward_model: str):
        self.cfg, self.p = cfg, cfg.ppo
        self.policy, self.reward_model = policy, reward_model
        self.cpus = cpu_share(self.p.num_generators + 2 * self.p.num_learners + 2)
        self.gpu = 1.0 if cfg.resources.num_gpus > 0 else 0.0
        self.common = {"num_threads": 1, "device": cfg.run.device}
        self.generators = [self._generator(i) for i in range(self.p.num_generators)]
        self.reward = self._reward()
        self.reference = self._reference()
        self.critics = self._group(CriticLearner, self.reward_model)
        self.start_learners()

    # ---- construction ---------------------------------------------------------------
    def _generator(self, i: int):
        return actor_class(RolloutGenerator, self.cpus, self.gpu * self.cfg.resources.gpus_per_generator).remote(
            self.policy, engine=self.p.engine, seed=self.cfg.run.seed + i, **self.common,
            engine_kwargs={"token_budget": self.p.generation_token_budget})

    def _reward(self):
        return actor_class(RewardScorer, self.cpus, self.gpu).remote(self.reward_model, **self.common)

    def _reference(self):
        return actor_class(ReferenceScorer, self.cpus, self.gpu).remote(self.policy, **self.common)

    def _group(self, cls: type, path: str) -> WorkerGroup:
        return WorkerGroup(cls, self.p.num_learners, path, num_cpus=self.cpus, num_gpus=self.gpu,
                           ppo=self.p, optimizer=self.cfg.optimizer, seed=self.cfg.run.seed, **self.common)

    def start_learners(self) -> None:
        """A fresh policy group (initial weights) and the weight sync from its rank 0."""
        self.learners = self._group(PolicyLearner, self.policy)
        self.weight_sync = make_sync(self.p.engine, self.learners, self.generators)

    # ---- restarts --------------------------------------------------------------------
    def restart_generator(self, i: int) -> None:
        """A fresh generator i, synced to the learners' current version before it samples."""
        ray.kill(self.generators[i], no_restart=True)
        self.generators[i] = self._generator(i)
        self.weight_sync.reconnect(self.generators[i])
        self.weight_sync.sync(only=[i])

    def restart_reward(self) -> None:
        ray.kill(self.reward, no_restart=True)
        self.reward = self._reward()

    def restart_reference(self) -> None:
        ray.kill(self.reference, no_restart=True)
        self.reference = self._reference()

    def restart_critics(self, state: dict | None, since: CallLog) -> None:
        """A fresh critic group at `state` (None: the RM's weights), then `since` replayed."""
        self.critics.shutdown()  # every rank: a gloo group with a dead rank is broken
        self.critics = self._group(CriticLearner, self.reward_model)
        if state is not None:
            gather(self.critics.call_all("load_checkpoint_state", state), "critic")
        since.replay(self.critics, "critic")

    def restart_learners(self) -> None:
        """The policy group only: the critic group is separate (its own process group) and,
        if alive, only needs the checkpoint's state loaded."""
        self.learners.shutdown()  # every rank: a gloo group with a dead rank is broken
        self.start_learners()

    def shutdown(self) -> None:
        for a in [*self.generators, self.reward, self.reference]:
            ray.kill(a)
        self.learners.shutdown()
        self.critics.shutdown()
