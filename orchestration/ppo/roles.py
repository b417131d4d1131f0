"""Typed proxies, one per PPO actor role: the only code that calls the role's actors.

Each proxy shards a call across its actors, retries it through the run's
`FaultHandler` after a lost actor was restarted in place, and keeps what a restart
needs (the critic's call log). A call returns a `Call`; `.result()` is its value,
so several roles can work at once:

    values = team.critics.values(rollout)     # in flight ...
    old = team.learners.logprobs(rollout)     # ... together
    exp = build_experience(..., old.result(), values.result(), ...)

A lost policy-learner rank is not restarted here (its weights and Adam moments
exist nowhere else): `ActorLost` reaches the team, which rewinds the run.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import ray
import torch

from actors import WorkerGroup
from orchestration.ppo.faults import CallLog, FaultHandler, Pending, gather
from rlhf.batch import split_evenly
from rlhf.collate import LMBatch
from rlhf.experience import Experience, Rollout


class Call:
    """Work in flight on one role; `result()` waits (retrying after a restart) and finishes it.

    `pending` may be a list (one per actor, each retried alone): finish then gets their values.
    """

    def __init__(self, pending: Pending | list[Pending], finish: Callable[[list], Any] = lambda values: values):
        self._pending, self._finish = pending, finish

    def result(self) -> Any:
        if isinstance(self._pending, list):
            return self._finish([p.get() for p in self._pending])
        return self._finish(self._pending.get())


def _sharded_forward(group: WorkerGroup, method: str, rollout: Rollout) -> list[ray.ObjectRef]:
    shards = rollout.chunk(len(group))
    return group.call_sharded(method, [s.input_ids for s in shards], [s.attention_mask for s in shards])


class Generators:
    """The rollout generators: each samples an even share of the prompts with seed + its index.

    `sleeps` (colocated roles): `sleep` frees the engines' GPU memory for the learners and
    `wake` takes it back; a generator wakes by itself for a weight load or a sample, so
    no path (a rewind, a restart) can load weights into a sleeping engine.
    """
    role = "generator"

    def __init__(self, faults: FaultHandler, make: Callable[[int], Any], count: int, tokenizer,
                 max_new_tokens: int, temperature: float, top_p: float, sleeps: bool = False):
        self.faults, self.make, self.tok, self.sleeps = faults, make, tokenizer, sleeps
        self.sampling = (max_new_tokens, temperature, top_p)
        self.actors = [make(i) for i in range(count)]
        self.passes: list[tuple[int, int]] = []  # (rows, KV positions) of the last call's passes

    def __len__(self) -> int:
        return len(self.actors)

    def sample(self, prompts: list[str], seed: int) -> Rollout:
        """A lost generator is restarted, re-synced and its shard retried with the same seed,
        so the batch is the one it would have produced."""
        return self.submit(prompts, seed).result()[0]

    def submit(self, prompts: list[str], seed: int, install: ray.ObjectRef | None = None) -> Call:
        """`sample` in flight; its result is (rollout, the checksums `install` left on the generators).

        `install` (a learner's published weights): each generator loads them just before it
        samples, behind whatever it is still doing, so the driver need not wait for idle
        generators (asynchronous rollouts). A retried shard loads them again (`rewind`: they
        may be older than what a restart gave it), so it is sampled with the same weights.
        """
        ids = [self.tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        shards = split_evenly(list(zip(ids, prompts)), len(self.actors))

        def submit(i: int) -> list[ray.ObjectRef]:
            ids_i, texts_i = [s[0] for s in shards[i]], [s[1] for s in shards[i]]
            loads = [] if install is None else [self.actors[i].install_published.remote(install, rewind=True)]
            return loads + [self.actors[i].sample.remote(ids_i, texts_i, *self.sampling, seed + i)]
        refs_per_shard = 1 if install is None else 2
        which = [i for i, s in enumerate(shards) if s]
        calls = [self.faults.submit(self.role, partial(submit, i), [i] * refs_per_shard) for i in which]

        def finish(parts: list[list]) -> tuple[Rollout, list[str]]:
            self.passes = [p for part in parts for p in part[-1][1]]
            return Rollout.concat([part[-1][0] for part in parts]), [part[0] for part in parts if install]
        return Call(calls, finish)

    def sleep(self, level: int = 1) -> None:
        """Every engine frees its GPU memory (level 1: weights to CPU, KV cache dropped)."""
        if self.sleeps:
            self._all(lambda a: a.sleep.remote(level))

    def wake(self, tags: Sequence[str] | None = None) -> None:
        """Every engine takes back its memory: `tags` ("weights", "kv_cache") or all of it."""
        if self.sleeps:
            tags = None if tags is None else list(tags)
            self._all(lambda a: a.wake_up.remote(tags))

    def _all(self, call: Callable[[Any], ray.ObjectRef]) -> None:
        """`call` on every generator; a lost one is restarted (awake, synced) and the call retried."""
        indices = list(range(len(self.actors)))
        self.faults.submit(self.role, lambda: [call(self.actors[i]) for i in indices], indices).get()

    def restart(self, i: int) -> None:
        """A fresh generator i (the initial policy); the team syncs it before it samples."""
        ray.kill(self.actors[i], no_restart=True)
        self.actors[i] = self.make(i)

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)


class Scorer:
    """A frozen single-actor role (reward model, reference policy): restarted from disk."""

    def __init__(self, role: str, method: str, faults: FaultHandler, make: Callable[[], Any]):
        self.role, self.method, self.faults, self.make = role, method, faults, make
        self.actor = make()

    def __call__(self, rollout: Rollout) -> Call:
        ids, mask = rollout.input_ids, rollout.attention_mask
        return Call(self.faults.submit(self.role, lambda: [getattr(self.actor, self.method).remote(ids, mask)]),
                    lambda values: values[0])

    def restart(self, _: int = 0) -> None:
        ray.kill(self.actor, no_restart=True)
        self.actor = self.make()

    def shutdown(self) -> None:
        ray.kill(self.actor)


class _Group:
    """A role run by a WorkerGroup whose ranks each take an even shard of a batch."""
    role = ""
    file = ""  # its name in a checkpoint folder

    def __init__(self, faults: FaultHandler, make: Callable[[], WorkerGroup]):
        self.faults, self.make = faults, make
        self.group = make()

    def __len__(self) -> int:
        return len(self.group)

    @property
    def actors(self) -> list:
        return self.group.workers

    def _submit(self, submit: Callable[[], list[ray.ObjectRef]], finish=lambda values: values) -> Call:
        return Call(self.faults.submit(self.role, submit), finish)

    def _forward(self, method: str, rollout: Rollout) -> Call:
        return self._submit(lambda: _sharded_forward(self.group, method, rollout), _cat)

    def save_to(self, folder: Path) -> None:
        """Every rank writes its part into a checkpoint folder (`<role file>.pt` or `<role file>/`)."""
        gather(self.group.call_all("save_checkpoint", str(folder), self.file), self.role)

    def load_from(self, folder: Path) -> None:
        gather(self.group.call_all("load_checkpoint", str(folder), self.file), self.role)

    def fresh(self) -> None:
        """Every rank replaced: a gloo/NCCL group with a dead rank is broken for the survivors."""
        self.group.shutdown()
        self.group = self.make()

    def shutdown(self) -> None:
        self.group.shutdown()


class ShardedScorer(_Group):
    """A frozen role held by a group (the reference: sharded when it has several ranks), each
    rank scoring an even share; a lost rank breaks the group's collectives, so all are replaced
    (from disk) and the call retried."""

    def __init__(self, role: str, method: str, faults: FaultHandler, make: Callable[[], WorkerGroup]):
        self.role, self.method = role, method
        super().__init__(faults, make)

    def __call__(self, rollout: Rollout) -> Call:
        return self._forward(self.method, rollout)

    def restart(self, _: int = 0) -> None:
        self.fresh()


class Learners(_Group):
    """The policy group: PPO-ptx steps, old logprobs, weights out."""
    role, file = "learner", "policy"

    def logprobs(self, rollout: Rollout) -> Call:
        return self._forward("logprobs", rollout)

    def train(self, minibatch: Experience, ptx: LMBatch | None, ptx_coef: float) -> Call:
        """One joint PPO(+ptx) optimizer step; the result is each rank's stats."""
        n = len(self.group)
        ptx_shards = ptx.chunk(n) if ptx is not None else [None] * n
        return self._submit(lambda: self.group.call_sharded(
            "train_minibatch", minibatch.chunk(n), ptx_shards, ptx_coef=ptx_coef))

    def end_iteration(self) -> Call:
        return self._submit(lambda: self.group.call_all("end_iteration"))

    def save_final(self, path) -> None:
        """Rank 0 writes the EMA policy, as the paper evaluates it (gathered first when sharded)."""
        gather(self.group.call_all("save_pretrained", str(path), use_ema=True), self.role)


class Critics(_Group):
    """The value group. Its state since the last checkpoint is that checkpoint plus the
    calls made since, so a restart loads the one and replays the other (bit for bit on CPU)."""
    role, file = "critic", "critic"

    def __init__(self, faults: FaultHandler, make: Callable[[], WorkerGroup]):
        super().__init__(faults, make)
        self.calls = CallLog()

    def values(self, rollout: Rollout) -> Call:
        return self._forward("values", rollout)

    def train(self, minibatch: Experience) -> Call:
        shards = minibatch.chunk(len(self.group))
        return self._submit(lambda: self.group.call_sharded("train_minibatch", shards),
                            self._logged("train_minibatch", shards))

    def end_iteration(self) -> Call:
        return self._submit(lambda: self.group.call_all("end_iteration"), self._logged("end_iteration"))

    def _logged(self, method: str, *shards: Sequence) -> Callable[[list], list]:
        """A finish that records the call once it succeeded (a retried one is recorded once)."""
        def finish(values: list) -> list:
            self.calls.record(method, *shards)
            return values
        return finish

    def restart(self, folder: Path | None) -> None:
        """A fresh group at checkpoint `folder` (None: the RM's weights), then the calls since replayed."""
        self.fresh()
        if folder is not None:
            self.load_from(folder)
        self.calls.replay(self.group, self.role)

    def checkpointed(self) -> None:
        """The checkpoint now holds the critic's state: nothing before it needs replaying."""
        self.calls.clear()


def _cat(values: list) -> torch.Tensor:
    return torch.cat(values)
