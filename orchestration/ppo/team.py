"""The actors of one PPO run, by role, and what happens when one of them is lost.

The team builds every role from the spec list (`rlhf.placement.actor_specs`, also
what `--dry-run` prints) and wires their restarts into one `FaultHandler`:

  generator          frozen between syncs: recreated, synced to the CURRENT weight
                     version, its shard retried with the same seed
  reward, reference  frozen: recreated from disk, the call retried
  critic             trained: recreated at the last checkpoint's state, the calls
                     since replayed (`roles.Critics`), the call retried
  learner            the policy group: `rewind` puts the run back at the last
                     checkpoint, since its weights, Adam moments and EMA exist
                     nowhere else; the critic goes back there too

`ppo.max_restarts` bounds restarts between two completed iterations, so a role
that keeps dying stops the run instead of looping.
"""
from __future__ import annotations

import ray

from actors import (CriticLearner, PolicyLearner, ReferenceScorer, RewardScorer, RolloutGenerator,
                    WorkerGroup, actor_class)
from orchestration.ppo import checkpoints
from orchestration.ppo.faults import ActorLost, FaultHandler
from orchestration.ppo.roles import Critics, Generators, Learners, Scorer
from orchestration.ppo.weight_sync import make_sync
from orchestration.rundir import StageDir
from rlhf.config import Config
from rlhf.placement import ActorSpec, actor_specs
from rlhf.seeds import derive_seed


class ActorTeam:
    def __init__(self, cfg: Config, stage: StageDir, policy: str, reward_model: str, tokenizer):
        self.cfg, self.p, self.stage = cfg, cfg.ppo, stage
        self.policy, self.reward_model = policy, reward_model
        self.specs = {s.role: s for s in actor_specs(cfg, ray.cluster_resources().get("CPU", 1.0))}
        self.faults = FaultHandler(self.p.max_restarts, {
            "generator": self._restart_generator, "reward": lambda _: self.reward.restart(),
            "reference": lambda _: self.reference.restart(),
            "critic": lambda _: self.critics.restart(checkpoints.latest(stage, "critic.pt"))})
        self.generators = Generators(self.faults, self._generator, self.specs["generator"].count, tokenizer,
                                     cfg.model.max_response_tokens, self.p.temperature, self.p.top_p)
        self.reward = Scorer("reward", "score", self.faults, lambda: self._actor(
            RewardScorer, "reward", self.reward_model))
        self.reference = Scorer("reference", "logprobs", self.faults, lambda: self._actor(
            ReferenceScorer, "reference", self.policy, temperature=self.p.temperature))
        self.critics = Critics(self.faults, lambda: self._group(CriticLearner, "critic", self.reward_model))
        self.learners = Learners(self.faults, lambda: self._group(PolicyLearner, "learner", self.policy))
        self._weight_sync = make_sync(self.p.engine, self.learners.group, self.generators.actors)
        self.last_sync: dict = {}

    # ---- construction ---------------------------------------------------------------
    def _options(self, role: str) -> tuple[ActorSpec, dict]:
        spec = self.specs[role]
        return spec, {"num_threads": spec.num_threads, "device": self.cfg.run.device}

    def _actor(self, cls: type, role: str, *args, **kwargs):
        spec, common = self._options(role)
        return actor_class(cls, spec.num_cpus, spec.num_gpus).remote(*args, **common, **kwargs)

    def _generator(self, i: int):
        return self._actor(RolloutGenerator, "generator", self.policy, engine=self.p.engine,
                           seed=derive_seed(self.cfg.run.seed, "generator", i),
                           engine_kwargs={"token_budget": self.p.generation_token_budget})

    def _group(self, cls: type, role: str, path: str) -> WorkerGroup:
        spec, common = self._options(role)
        return WorkerGroup(cls, spec.count, path, num_cpus=spec.num_cpus, num_gpus=spec.num_gpus,
                           ppo=self.p, optimizer=self.cfg.optimizer, seed=self.cfg.run.seed, **common)

    # ---- weights --------------------------------------------------------------------
    def sync(self, rewind: bool = False) -> dict:
        """Broadcast the learners' weights to every generator (bucketed, versioned), verified
        by checksum; a lost generator is restarted and the broadcast repeated."""
        self.last_sync = self.faults.retrying(lambda: self._weight_sync.sync(rewind=rewind))
        return self.last_sync

    def _restart_generator(self, i: int) -> None:
        self.generators.restart(i)
        self._weight_sync.reconnect(self.generators.actors[i])
        self._weight_sync.sync(only=[i])

    # ---- checkpoints and the rewind ---------------------------------------------------
    def checkpoint_states(self) -> dict[str, dict]:
        return {"policy.pt": self.learners.state(), "critic.pt": self.critics.state()}

    def checkpointed(self) -> None:
        self.critics.checkpointed()

    def load(self, states: dict[str, dict]) -> None:
        """A checkpoint's learner and critic states into the running groups."""
        self.critics.calls.clear()
        self.learners.load(states["policy.pt"])
        self.faults.retrying(lambda: self.critics.load(states["critic.pt"]))

    def rewind(self, lost: ActorLost) -> dict | None:
        """After a lost learner rank: a fresh policy group, it and the critic at the last
        checkpoint, generators re-synced. Returns that checkpoint's states (None: the start)."""
        states: dict | None = None

        def restart(_: int) -> None:
            nonlocal states
            self.learners.fresh()
            self._weight_sync = make_sync(self.p.engine, self.learners.group, self.generators.actors)
            states = checkpoints.load_latest(self.stage)
            if states is None:  # back to the start: the critic's initial weights too
                self.critics.calls.clear()
                self.critics.restart(None)
            else:
                self.load(states)
            self.sync(rewind=True)
        self.faults.recover(lost, restart)
        return states

    def completed(self, iteration: int) -> None:
        """A newly completed iteration is progress: the restart budget is whole again."""
        self.faults.progress(iteration)

    # ---- measurement -------------------------------------------------------------------
    def handles(self, role: str) -> list:
        """The live actor handles of a role (tests use them to kill processes)."""
        return {"generator": lambda: list(self.generators.actors), "reward": lambda: [self.reward.actor],
                "reference": lambda: [self.reference.actor], "critic": lambda: list(self.critics.actors),
                "learner": lambda: list(self.learners.actors)}[role]()

    def shutdown(self) -> None:
        for role in (self.generators, self.reward, self.reference, self.learners, self.critics):
            role.shutdown()
