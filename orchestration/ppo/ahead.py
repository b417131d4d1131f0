"""Asynchronous rollouts (`ppo.async_rollouts`): batches sampled ahead of the learners.

    iteration k:  take rollout k (sampled with v_{k-s}, 1 <= s <= max_staleness after the first)
                  publish v_k; queue on every generator: install v_k, then sample rollout k + N
                  ... score and learn on rollout k while the generators sample ...

N = `ppo.max_staleness` batches are in flight, so the learners never wait for sampling
once it is faster than learning, and a rollout is at most N versions older than the
learner that trains on it (the learner refuses anything older). Installing before
sampling, in the generator's own queue, means the driver never waits for idle
generators to sync them. Rollout j always takes the j-th batch of prompts and the seed
of iteration j, as in the synchronous loop.

A checkpoint waits for the batches in flight and stores them (the weights that sampled
them are not in it), so a resumed run trains on exactly the rollouts the uninterrupted
one did.
"""
from __future__ import annotations

from collections import deque
from typing import Callable

from orchestration.ppo.roles import Call
from orchestration.ppo.team import ActorTeam
from rlhf.experience import Rollout
from rlhf.seeds import derive_seed

EMPTY = {"next": 0, "rollouts": []}  # the state before the first iteration


class _Ahead:
    """Rollout `j` in flight (or done): its sampling call and the weights it installs."""

    def __init__(self, j: int, sampling: Call | None = None, published=None,
                 done: tuple[Rollout, dict, list] | None = None):
        self.j, self._sampling, self._published, self._done = j, sampling, published, done

    def result(self, generators) -> tuple[Rollout, dict, list]:
        """(rollout, the sync's metrics, its generation passes), once every generator verifiably
        sampled with v."""
        if self._done is None:
            rollout, loaded = self._sampling.result()
            self._done = rollout, self._published.verify(lambda: loaded), list(generators.passes)
            self._sampling = self._published = None  # the published weights may go
        return self._done


class RolloutsAhead:
    def __init__(self, team: ActorTeam, take_prompts: Callable[[], list[str]], seed: int,
                 depth: int, iterations: int):
        self.team, self.take_prompts, self.seed = team, take_prompts, seed
        self.depth, self.iterations = depth, iterations
        self.queue: deque[_Ahead] = deque()
        self.next = 0  # the next rollout to launch
        self.published = None  # the weights of the latest launch (v_k after fill(k); the probe's)

    def take(self, k: int) -> tuple[Rollout, dict]:
        """Rollout k and its sync metrics; sampled now, with the current weights, if none is ahead."""
        if not self.queue:
            self.published = None
            self._launch()
        ahead = self.queue.popleft()
        if ahead.j != k:
            raise RuntimeError(f"rollout {ahead.j} is next in flight, iteration {k} wants its own")
        rollout, sync, passes = ahead.result(self.team.generators)
        self.team.generators.passes = passes  # what the observer reports for this rollout
        return rollout, sync

    def fill(self, k: int) -> None:
        """Publish v_k and launch rollouts up to k + depth with it (never past the last iteration)."""
        self.published = self.team.publish()
        while self.next <= min(k + self.depth, self.iterations - 1):
            self._launch()

    def _launch(self) -> None:
        j = self.next
        if self.published is None:  # nothing ahead yet: the current weights
            self.published = self.team.publish()
        sampling = self.team.generators.submit(self.take_prompts(), seed=derive_seed(self.seed, "rollout", j),
                                               install=self.published.ref)
        self.queue.append(_Ahead(j, sampling, self.published))
        self.next += 1

    # ---- checkpoints ----------------------------------------------------------------
    def state_dict(self) -> dict:
        """Waits for the batches in flight: they are part of the state."""
        rollouts = []
        for ahead in self.queue:
            rollout, sync, passes = ahead.result(self.team.generators)
            rollouts.append({"j": ahead.j, "rollout": rollout.as_dict(), "sync": sync, "passes": passes})
        return {"next": self.next, "rollouts": rollouts}

    def load_state_dict(self, state: dict) -> None:
        """Back to a saved state; whatever is in flight now is dropped (its results unread)."""
        self.next, self.published = state["next"], None
        self.queue = deque(_Ahead(r["j"], done=(Rollout(**r["rollout"]), r["sync"], r["passes"]))
                           for r in state["rollouts"])
