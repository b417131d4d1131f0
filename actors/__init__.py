"""Ray actor roles of the PPO stage, one per file (docs/architecture.md).

Classes here are plain Python; run them as actors with
`actors.resources.actor_class(cls, num_cpus=..., num_gpus=...)` or, for the
learner groups, `actors.group.WorkerGroup(cls, n, ...)`. Exports load lazily so
`import actors.weight_sync` does not pull in transformers.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "CriticLearner": "actors.critic",
    "RolloutGenerator": "actors.generator",
    "DistributedWorker": "actors.group",
    "WorkerGroup": "actors.group",
    "PolicyLearner": "actors.policy_learner",
    "StaleRolloutError": "actors.policy_learner",
    "ReferenceScorer": "actors.reference_scorer",
    "RewardScorer": "actors.reward_scorer",
    "actor_class": "actors.resources",
    "configure_threads": "actors.resources",
    "pick_device": "actors.resources",
    "BucketMeta": "actors.weight_sync",
    "checksum": "actors.weight_sync",
    "pack_buckets": "actors.weight_sync",
    "put_buckets": "actors.weight_sync",
    "unpack_buckets": "actors.weight_sync",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'actors' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
