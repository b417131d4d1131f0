"""Surviving lost actors and non-finite steps: the mechanism the team's roles share.

A lost actor is one whose process died (`ray.exceptions.RayActorError`: SIGKILL,
OOM killer, node loss) or whose result died with its node (`ObjectLostError`);
`gather` turns that into `ActorLost` naming the role and index. `FaultHandler`
restarts a lost role through its restarter and retries the work, counting restarts
against `ppo.max_restarts` between two points of progress; what each role's restart
restores is described in orchestration/ppo/team.py. Restart counts (`<role>_restarts`
in the metrics) are cumulative over the driver.
"""
from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Callable, Sequence

import ray

log = logging.getLogger(__name__)

ROLES = ("generator", "reward", "reference", "critic", "learner")


class ActorLost(RuntimeError):
    """Actor `index` of `role` died while serving a call."""

    def __init__(self, role: str, index: int, cause: BaseException):
        first_line = (str(cause).splitlines() or [""])[0]
        super().__init__(f"{role} {index} lost ({type(cause).__name__}: {first_line})")
        self.role, self.index, self.cause = role, index, cause


class TooManyRestarts(RuntimeError):
    """More restarts without progress than `ppo.max_restarts` allows."""


class NonFiniteTraining(RuntimeError):
    """Too many optimizer steps in a row were skipped for a non-finite loss or gradient."""


def gather(refs: Sequence[ray.ObjectRef], role: str, indices: Sequence[int] | None = None) -> list:
    """Every ref's value; ActorLost if an actor behind any of them died, else its first error.

    Waits until every ref has finished or one actor is known dead, so the other
    ranks' errors (a broken collective) are not mistaken for the cause, and a
    survivor stuck in a collective with the dead rank (until the gloo timeout,
    minutes) does not hold the restart up: the restart replaces it anyway.
    `indices[i]` names the actor behind refs[i] (default: i).
    """
    values: list[Any] = [None] * len(refs)
    position = {ref: i for i, ref in enumerate(refs)}
    error: BaseException | None = None
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        i = position[ready[0]]
        try:
            values[i] = ray.get(ready[0])
        except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as e:
            # a lost node takes its actors and the results they held in its object store
            raise ActorLost(role, indices[i] if indices else i, e) from e
        except Exception as e:  # noqa: BLE001 - re-raised below unless a death explains it
            error = error or e
    if error is not None:
        raise error
    return values


class FaultHandler:
    """Restarts lost roles through `restarters[role](index)` and retries the work."""

    def __init__(self, max_restarts: int, restarters: dict[str, Callable[[int], None]]):
        self.max_restarts = max_restarts
        self.restarters = restarters
        self.counts: Counter[str] = Counter()
        self.incarnation: Counter[tuple[str, int]] = Counter()  # (role, index) -> restarts so far
        self.events: list[dict] = []  # one per restart: iteration, phase, role, index, error
        self.where: tuple[int, str] = (0, "start")  # (iteration, phase) now running
        self._since_progress = 0
        self._best = 0

    def spend(self, lost: ActorLost) -> None:
        """Count one restart of `lost.role`; raises once the budget is exhausted."""
        self._since_progress += 1
        if self._since_progress > self.max_restarts:
            raise TooManyRestarts(
                f"{lost}: {self._since_progress} actor restarts without completing a new iteration "
                f"(ppo.max_restarts = {self.max_restarts}); giving up") from lost
        self.counts[lost.role] += 1
        iteration, phase = self.where
        self.events.append({"iteration": iteration, "phase": phase, "role": lost.role,
                            "index": lost.index, "error": type(lost.cause).__name__})
        log.warning("%s during %s of iteration %d; restarting (%d of at most %d in a row)",
                    lost, phase, iteration, self._since_progress, self.max_restarts)

    def progress(self, completed: int) -> None:
        """`completed` iterations are done; a new high resets the restart budget."""
        if completed > self._best:
            self._best, self._since_progress = completed, 0

    def recover(self, lost: ActorLost, restart: Callable[[int], None]) -> None:
        """restart(index) until it succeeds; each attempt is one restart of the budget."""
        while True:
            self.spend(lost)
            try:
                restart(lost.index)
                self.incarnation[(lost.role, lost.index)] += 1
                return
            except ActorLost as again:  # lost while restarting: the same role again, or another
                if again.role != lost.role:
                    raise
                lost = again

    def retrying(self, call: Callable[[], Any], replaced: Callable[[ActorLost], bool] = lambda lost: False) -> Any:
        """call() until it returns; a lost role with a restarter is restarted in between.

        A lost role without one (the learner) propagates to the caller. `replaced(lost)`:
        the actor that died was already restarted (another call found it dead first), so
        the call is only made again.
        """
        while True:
            try:
                return call()
            except ActorLost as lost:
                restart = self.restarters.get(lost.role)
                if restart is None:
                    raise
                if not replaced(lost):
                    self.recover(lost, restart)

    def submit(self, role: str, submit: Callable[[], list[ray.ObjectRef]],
               indices: Sequence[int] | None = None) -> "Pending":
        """Start `submit()` now (so several calls run at once); `.get()` retries it if lost."""
        return Pending(self, role, submit, indices)

    def metrics(self) -> dict[str, int]:
        return {f"{role}_restarts": self.counts[role] for role in ROLES}


class Pending:
    """Calls already in flight; `get` gathers them, resubmitting after a restart."""

    def __init__(self, faults: FaultHandler, role: str, submit: Callable[[], list[ray.ObjectRef]],
                 indices: Sequence[int] | None = None):
        self.faults, self.role, self._submit, self.indices = faults, role, submit, indices
        self._refs: list[ray.ObjectRef] | None = self._start()

    def _start(self) -> list[ray.ObjectRef]:
        self._incarnation = self.faults.incarnation.copy()  # which actors the refs went to
        return self._submit()

    def get(self) -> list:
        def attempt() -> list:
            refs, self._refs = self._refs, None
            return gather(refs if refs is not None else self._start(), self.role, self.indices)

        def replaced(lost: ActorLost) -> bool:  # several calls in flight on one actor (async rollouts)
            key = (lost.role, lost.index)
            return self.faults.incarnation[key] > self._incarnation[key]
        return self.faults.retrying(attempt, replaced)


class CallLog:
    """The calls made on a trained group since its last checkpoint, replayed after a restart.

    Training on CPU is deterministic given the same calls in the same order, so
    checkpoint state + replay restores the group bit for bit.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple]] = []

    def record(self, method: str, *shards: Sequence) -> None:
        self.calls.append((method, shards))

    def clear(self) -> None:
        self.calls = []

    def replay(self, group, role: str) -> None:
        for method, shards in self.calls:
            gather(group.call_sharded(method, *shards), role)


class NonFiniteGuard:
    """Counts skipped (non-finite) optimizer steps in a row per model; stops at the limit."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_a_row: Counter[str] = Counter()

    def observe(self, model: str, skipped: bool) -> None:
        self.in_a_row[model] = self.in_a_row[model] + 1 if skipped else 0
        if self.in_a_row[model] >= self.limit:
            raise NonFiniteTraining(
                f"{model}: {self.in_a_row[model]} optimizer steps in a row had a non-finite loss or "
                f"gradient and were skipped (ppo.max_nonfinite_steps = {self.limit}); the weights are "
                f"those of the last finite step. Check the reward model's scores and the learning rate")

    def state_dict(self) -> dict:
        return dict(self.in_a_row)

    def load_state_dict(self, state: dict) -> None:
        self.in_a_row = Counter(state)
