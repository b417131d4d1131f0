"""The PPO stage's actors: one spec per role, read by the team that starts them and by `--dry-run`.

A CPU share is what Ray reserves for an actor; on a small machine every actor gets an
equal fraction, so all of them fit at once. Threads follow from the share
(whole cores, at least one), the same rule every actor applies when it starts.

With `resources.colocate` every role shares the same devices (veRL's hybrid
placement): one Ray placement group, one bundle per GPU (per device slot on a CPU
machine), and each bundle split in equal fractions between the actors seated in it,
at most one actor of a role per bundle, so a group's ranks each have a device of
their own. The GPUs needed are then the largest role's, not the sum.
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
    counts = {"generator": p.num_generators, "reward": 1, "reference": p.num_reference_scorers,
              "critic": p.num_learners, "learner": p.num_learners}
    cpus = cpu_share(sum(counts.values()), total_cpus)
    # One thread each, but the policy ranks share every core: the phases take turns, and in
    # the learn phase only the critics run beside them, for a fraction of the time (no ptx rows).
    threads = {"learner": max(1, math.floor(total_cpus / p.num_learners))}
    gpus = {"generator": gpu * cfg.resources.gpus_per_generator}  # a vLLM engine's tensor parallel size
    titles = {"generator": "rollout generator", "reward": "reward scorer", "reference": "reference scorer",
              "critic": "critic learner", "learner": "policy learner"}
    return [ActorSpec(role, titles[role], n, cpus, gpus.get(role, gpu), threads.get(role, 1))
            for role, n in counts.items()]


def gpus_needed(cfg: Config) -> int:
    totals = [s.total_gpus for s in actor_specs(cfg, total_cpus=1.0)]
    # Colocated roles take turns on the same GPUs: the largest role sets the count.
    return math.ceil(max(totals) if cfg.resources.colocate else sum(totals))


# ---------------------------------------------------------------- colocation

# What a colocated vLLM engine may take of its shared GPU when awake (weights, KV cache,
# activations); the learners' weights and optimizer state stay resident beside it.
COLOCATED_GPU_MEMORY_UTILIZATION = 0.3
_UNIT = 1e-4  # Ray accounts resources in fixed point of 1/10000: shares are floored to it


@dataclass(frozen=True)
class Seat:
    """Where one colocated actor runs: its bundle and its share of that bundle."""
    bundle: int
    num_cpus: float
    num_gpus: float


@dataclass(frozen=True)
class ColocatedLayout:
    bundles: tuple[dict[str, float], ...]           # the placement group's, in order
    seats: dict[str, tuple[Seat, ...]]              # role -> one per actor, in index order
    strategy: str = "PACK"  # bundles on as few nodes as possible (a bundle never spans nodes)


def _floor(x: float) -> float:
    return math.floor(x / _UNIT + 1e-6) * _UNIT


def colocated_layout(cfg: Config, total_cpus: float) -> ColocatedLayout:
    """One bundle per device slot; actors seated greedily on the least-filled bundle that
    holds no actor of their role yet, largest roles first (ties: the lowest bundle)."""
    specs = actor_specs(cfg, total_cpus)
    n = max(s.count for s in specs)
    members: list[list[str]] = [[] for _ in range(n)]
    where: dict[str, list[int]] = {}
    for spec in sorted(specs, key=lambda s: -s.count):  # stable: spec order among equals
        where[spec.role] = []
        for _ in range(spec.count):
            b = min((b for b in range(n) if spec.role not in members[b]), key=lambda b: (len(members[b]), b))
            members[b].append(spec.role)
            where[spec.role].append(b)
    on_gpu = cfg.resources.num_gpus > 0
    seats = {s.role: tuple(Seat(b, _floor(s.num_cpus), _floor(1.0 / len(members[b])) if on_gpu else 0.0)
                           for b in where[s.role]) for s in specs}
    cpus = [sum(seat.num_cpus for row in seats.values() for seat in row if seat.bundle == b) for b in range(n)]
    bundles = tuple({"CPU": round(c, 4)} | ({"GPU": 1.0} if on_gpu else {}) for c in cpus)
    return ColocatedLayout(bundles, seats)


def colocation_problems(cfg: Config) -> list[tuple[str, str]]:
    """What `resources.colocate` cannot do yet, as (field, why) for check_trainable."""
    if not cfg.resources.colocate or cfg.resources.num_gpus == 0:
        return []
    p: list[tuple[str, str]] = []
    if cfg.resources.gpus_per_generator > 1:
        p.append(("resources.gpus_per_generator", "colocation seats one actor of each role on every GPU; "
                  "a tensor-parallel generator needs whole GPUs: set it to 1 or resources.colocate false"))
    elif cfg.ppo.engine == "vllm":
        # Colocated vLLM engines take their weights over CUDA IPC: every learner rank exports
        # its copy, and a generator opens the one on its own GPU, so each needs a learner rank there.
        layout = colocated_layout(cfg, total_cpus=1.0)
        learner_gpus = {s.bundle for s in layout.seats["learner"]}
        if any(s.bundle not in learner_gpus for s in layout.seats["generator"]):
            p.append(("ppo.num_generators", "colocated vLLM generators load their weights over CUDA IPC "
                      f"from the learner rank on their own GPU; {cfg.ppo.num_generators} generators and "
                      f"{cfg.ppo.num_learners} learner ranks leave some of their GPUs without one: "
                      "at most ppo.num_learners generators, or colocate false"))
    return p
