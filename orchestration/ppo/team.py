"""The actors of one PPO run, by role, and what happens when one of them is lost.

The team builds every role from the spec list (`rlhf.placement.actor_specs`, also
what `--dry-run` prints) and wires their restarts into one `FaultHandler`:

  generator          frozen between syncs: recreated, synced to the CURRENT weight
                     version, its shard retried with the same seed
  reward, reference  frozen: recreated from disk (the reference group whole), the call retried
  critic             trained: recreated at the last checkpoint's state, the calls
                     since replayed (`roles.Critics`), the call retried
  learner            the policy group: `rewind` puts the run back at the last
                     checkpoint, since its weights, Adam moments and EMA exist
                     nowhere else; the critic goes back there too

`ppo.max_restarts` bounds restarts between two completed iterations, so a role
that keeps dying stops the run instead of looping.

With `resources.colocate` every actor is seated in one placement group
(`rlhf.placement.colocated_layout`: a bundle per GPU, split in equal fractions), and
the generators sleep (free their GPU memory) while the other roles score and learn.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors import (CriticLearner, PolicyLearner, ReferenceScorer, RewardScorer, RolloutGenerator,
                    WorkerGroup, actor_class)
from orchestration.ppo import checkpoints
from orchestration.ppo.faults import ActorLost, FaultHandler
from orchestration.ppo.roles import Critics, Generators, Learners, Scorer, ShardedScorer
from orchestration.ppo.weight_sync import make_sync
from orchestration.rundir import StageDir
from rlhf.config import Config
from rlhf.placement import COLOCATED_GPU_MEMORY_UTILIZATION, actor_specs, colocated_layout
from rlhf.seeds import derive_seed
from rlhf.sharding import TrainLayout

log = logging.getLogger(__name__)

PLACEMENT_TIMEOUT_S = 120.0  # a colocated placement group that is not ready by then does not fit


def warn_if_unplaceable(actor: str, custom: dict[str, float]) -> None:
    """Log, once per actor made, that no alive node offers its custom resources (a lost node):
    Ray keeps the actor pending, and the run goes on once such a node joins."""
    alive = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    if not any(all(res.get(k, 0.0) >= v for k, v in custom.items()) for res in alive):
        log.warning("%s needs %s (resources.role_resources), which no alive node offers; waiting for a "
                    "node started with them (`ray start --address ... --resources '%s'`)", actor, custom,
                    json.dumps({k: 1 for k in custom}))


class ActorTeam:
    def __init__(self, cfg: Config, stage: StageDir, policy: str, reward_model: str, tokenizer):
        self.cfg, self.p, self.stage = cfg, cfg.ppo, stage
        self.policy, self.reward_model = policy, reward_model
        cpus = ray.cluster_resources().get("CPU", 1.0)
        self.specs = {s.role: s for s in actor_specs(cfg, cpus)}
        self.layout = colocated_layout(cfg, cpus) if cfg.resources.colocate else None
        self.placement_group = self._placement_group()
        self.faults = FaultHandler(self.p.max_restarts, {
            "generator": self._restart_generator, "reward": lambda _: self.reward.restart(),
            "reference": lambda _: self.reference.restart(),
            "critic": lambda _: self.critics.restart(stage.latest_checkpoint())})
        self.generators = Generators(self.faults, self._generator, self.specs["generator"].count, tokenizer,
                                     cfg.model.max_response_tokens, self.p.temperature, self.p.top_p,
                                     sleeps=cfg.resources.colocate)
        self.reward = Scorer("reward", "score", self.faults, lambda: self._actor(
            RewardScorer, "reward", 0, self.reward_model, dtype=cfg.model.dtype))
        self.reference = ShardedScorer("reference", "logprobs", self.faults, lambda: self._group(
            ReferenceScorer, "reference", self.policy, temperature=self.p.temperature, dtype=cfg.model.dtype))
        trains = dict(ppo=self.p, optimizer=cfg.optimizer, seed=cfg.run.seed, layout=TrainLayout.of(cfg))
        self.critics = Critics(self.faults, lambda: self._group(CriticLearner, "critic", self.reward_model, **trains))
        self.learners = Learners(self.faults, lambda: self._group(PolicyLearner, "learner", self.policy, **trains))
        self._weight_sync = self._make_sync()
        self.last_sync: dict = {}

    # ---- construction ---------------------------------------------------------------
    def _placement_group(self):
        """Colocated: the one placement group every role is seated in (None: each actor alone)."""
        if self.layout is None:
            return None
        pg = placement_group(list(self.layout.bundles), strategy=self.layout.strategy)
        if not pg.wait(timeout_seconds=PLACEMENT_TIMEOUT_S):
            remove_placement_group(pg)
            raise RuntimeError(f"the colocated placement group {list(self.layout.bundles)} did not fit the "
                               f"cluster ({ray.cluster_resources()}) within {PLACEMENT_TIMEOUT_S} s")
        return pg

    def _seat(self, role: str, index: int) -> tuple[float, float, dict]:
        """(num_cpus, num_gpus, Ray options) of actor `index` of `role` (a group's rank)."""
        spec = self.specs[role]
        if self.layout is None:
            custom = self.cfg.resources.role_resources.get(role)
            if custom:
                warn_if_unplaceable(f"{role} {index}", custom)
            return spec.num_cpus, spec.num_gpus, {"resources": custom} if custom else {}
        seat = self.layout.seats[role][index]  # its own bundle: a group's ranks a GPU each
        strategy = PlacementGroupSchedulingStrategy(self.placement_group, placement_group_bundle_index=seat.bundle)
        return seat.num_cpus, seat.num_gpus, {"scheduling_strategy": strategy}

    def _common(self, role: str) -> dict:
        return {"num_threads": self.specs[role].num_threads, "device": self.cfg.run.device}

    def _actor(self, cls: type, role: str, index: int, *args, **kwargs):
        num_cpus, num_gpus, options = self._seat(role, index)
        return actor_class(cls, num_cpus, num_gpus, **options).remote(*args, **self._common(role), **kwargs)

    def _generator(self, i: int):
        return self._actor(RolloutGenerator, "generator", i, self.policy, engine=self.p.engine,
                           seed=derive_seed(self.cfg.run.seed, "generator", i),
                           engine_kwargs=self._engine_kwargs())

    def _engine_kwargs(self) -> dict:
        """What the chosen engine takes (vLLM refuses the hf engine's token budget)."""
        if self.p.engine != "vllm":
            return {"token_budget": self.p.generation_token_budget}
        # In model.dtype, as the memory plan counts it (vLLM's "auto" would follow the checkpoint).
        kw: dict = {"tensor_parallel_size": self.cfg.resources.gpus_per_generator, "dtype": self.cfg.model.dtype}
        if self.cfg.resources.colocate:
            from actors.engines.vllm_engine import colocated_kwargs
            kw |= colocated_kwargs(COLOCATED_GPU_MEMORY_UTILIZATION)
        return kw

    def _group(self, cls: type, role: str, path: str, **kwargs) -> WorkerGroup:
        count = self.specs[role].count
        ranks = [dict(num_cpus=c, num_gpus=g, **options) for c, g, options in
                 (self._seat(role, i) for i in range(count))]
        return WorkerGroup(cls, count, path, rank_options=ranks, **self._common(role), **kwargs)

    def _make_sync(self):
        """The learner -> generators broadcast; colocated vLLM engines share the learner's GPU,
        where NCCL refuses two ranks on one device, so they take CUDA IPC."""
        backend = "ipc" if self.cfg.resources.colocate else "nccl"
        return make_sync(self.p.engine, self.learners.group, self.generators.actors, backend=backend)

    # ---- weights --------------------------------------------------------------------
    def sync(self, rewind: bool = False) -> dict:
        """Broadcast the learners' weights to every generator (bucketed, versioned), verified
        by checksum; a lost generator is restarted and the broadcast repeated."""
        self.last_sync = self.faults.retrying(lambda: self._weight_sync.sync(rewind=rewind))
        return self.last_sync

    def publish(self):
        """The learners' weights published for generators to install later (asynchronous
        rollouts, object-store transport only: config refuses them with vLLM)."""
        return self._weight_sync.publish()

    def _restart_generator(self, i: int) -> None:
        self.generators.restart(i)
        self._weight_sync.reconnect(self.generators.actors[i])
        self._weight_sync.sync(only=[i])

    # ---- checkpoints and the rewind ---------------------------------------------------
    def save_checkpoint(self, folder: Path) -> None:
        """The learner and critic groups write their state into a checkpoint folder
        (rank 0's replica, or every rank's shard)."""
        self.learners.save_to(folder)
        checkpoints.pause_for_tests()
        self.critics.save_to(folder)

    def checkpointed(self) -> None:
        self.critics.checkpointed()

    def load(self, folder: Path) -> None:
        """A checkpoint's learner and critic states into the running groups."""
        self.critics.calls.clear()
        self.learners.load_from(folder)
        self.faults.retrying(lambda: self.critics.load_from(folder))

    def rewind(self, lost: ActorLost) -> checkpoints.Checkpoint | None:
        """After a lost learner rank: a fresh policy group, it and the critic at the last
        checkpoint, generators re-synced. Returns that checkpoint (None: the start)."""
        states: checkpoints.Checkpoint | None = None

        def restart(_: int) -> None:
            nonlocal states
            self.learners.fresh()
            self._weight_sync = self._make_sync()
            states = checkpoints.load_latest(self.stage)
            if states is None:  # back to the start: the critic's initial weights too
                self.critics.calls.clear()
                self.critics.restart(None)
            else:
                self.load(states.folder)
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
                "reference": lambda: list(self.reference.actors), "critic": lambda: list(self.critics.actors),
                "learner": lambda: list(self.learners.actors)}[role]()

    def shutdown(self) -> None:
        for role in (self.generators, self.reward, self.reference, self.learners, self.critics):
            role.shutdown()
        if self.placement_group is not None:  # its reservation outlives the actors otherwise
            remove_placement_group(self.placement_group)
            self.placement_group = None
