"""The PPO stage's actors: one spec per role, read by the team that starts them and by `--dry-run`.

A CPU share is what Ray reserves for an actor; on a small machine every actor gets an
equal fraction, so all of them fit at once. Threads follow from the share
(whole cores, at least one), the same rule every actor applies when it starts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from rlhf.config import Config


@dataclass(frozen=True)
class ActorSpec:
    role: str          # generator, reward, reference, critic, learner
    title: str         # how the plan names it
    count: int
    num_cpus: float    # each
    num_gpus: float    # each
    num_threads: int   # torch intra-op threads each

    @property
    def total_gpus(self) -> float:
        return self.count * self.num_gpus


def cpu_share(actors: int, total_cpus: float) -> float:
    """A fractional CPU request so `actors` actors fit beside each other on a small machine."""
    return max(0.01, min(1.0, total_cpus / max(actors, 1) / 2))


def actor_specs(cfg: Config, total_cpus: float) -> list[ActorSpec]:
    """Every PPO actor role; `total_cpus` is the cluster's (or the machine's, for a plan)."""
    p = cfg.ppo
    gpu = 1.0 if cfg.resources.num_gpus > 0 else 0.0
    counts = {"generator": p.num_generators, "reward": 1, "reference": 1,
              "critic": p.num_learners, "learner": p.num_learners}
    cpus = cpu_share(sum(counts.values()), total_cpus)
    # One thread each: on 2 cores, more per actor oversubscribes the machine.
    threads = 1
    gpus = {"generator": gpu * cfg.resources.gpus_per_generator}  # a vLLM engine's tensor parallel size
    titles = {"generator": "rollout generator", "reward": "reward scorer", "reference": "reference scorer",
              "critic": "critic learner", "learner": "policy learner"}
    return [ActorSpec(role, titles[role], n, cpus, gpus.get(role, gpu), threads)
            for role, n in counts.items()]


def gpus_needed(cfg: Config) -> int:
    return math.ceil(sum(s.total_gpus for s in actor_specs(cfg, total_cpus=1.0)))
