"""The fault handler on real process deaths: small plain-Python actors that SIGKILL themselves.

Cheap stand-ins for the PPO actors (no torch in them), so the retry and restart-budget
rules are checked on real `ActorDiedError`s in seconds.
"""
from __future__ import annotations

import pytest
import ray

from orchestration.ppo.faults import ActorLost, FaultHandler, TooManyRestarts, gather


def _worker_class():
    # Defined in a function: pickled by value, since the workers cannot import this module.
    class Worker:
        def __init__(self, dies: bool):
            self.dies = dies

        def square(self, x: int) -> int:
            if self.dies:
                import os
                import signal
                os.kill(os.getpid(), signal.SIGKILL)
            return x * x

        def fail(self) -> None:
            raise ValueError("a bug, not a fault")
    return ray.remote(Worker).options(num_cpus=0.01)


@pytest.fixture(scope="module")
def Worker(ray_local):
    return _worker_class()


def test_a_killed_actor_is_restarted_and_its_call_retried(Worker):
    team = {"w": Worker.remote(dies=True)}

    def restart(index: int) -> None:
        team["w"] = Worker.remote(dies=False)
    faults = FaultHandler(max_restarts=1, restarters={"generator": restart})
    pending = faults.submit("generator", lambda: [team["w"].square.remote(7)], [3])
    assert pending.get() == [49]
    assert faults.metrics()["generator_restarts"] == 1
    assert [(e["role"], e["index"], e["error"]) for e in faults.events] == [("generator", 3, "ActorDiedError")]


def test_restarts_are_bounded_without_progress_and_reset_by_it(Worker):
    team = {"w": Worker.remote(dies=True)}

    def restart(index: int) -> None:  # every replacement dies too: a crash loop
        team["w"] = Worker.remote(dies=True)
    faults = FaultHandler(max_restarts=2, restarters={"reward": restart})
    with pytest.raises(TooManyRestarts, match=r"3 actor restarts without completing a new iteration "
                                              r"\(ppo.max_restarts = 2\)"):
        faults.retrying(lambda: gather([team["w"].square.remote(2)], "reward"))
    assert faults.counts["reward"] == 2

    faults.progress(1)  # a new iteration completed: the budget is whole again
    team["w"] = Worker.remote(dies=True)
    with pytest.raises(TooManyRestarts):
        faults.retrying(lambda: gather([team["w"].square.remote(2)], "reward"))
    assert faults.counts["reward"] == 4


def test_a_role_without_restarter_propagates(Worker):
    faults = FaultHandler(max_restarts=3, restarters={})
    w = Worker.remote(dies=True)
    with pytest.raises(ActorLost, match="learner 0 lost") as e:
        faults.retrying(lambda: gather([w.square.remote(1)], "learner"))
    assert isinstance(e.value.cause, ray.exceptions.ActorDiedError) and not faults.events


def test_gather_blames_the_dead_rank_not_the_survivors_error(Worker):
    healthy, dying = Worker.remote(dies=False), Worker.remote(dies=True)
    with pytest.raises(ActorLost) as e:
        gather([healthy.fail.remote(), dying.square.remote(3)], "critic")
    assert (e.value.role, e.value.index) == ("critic", 1)
    # without a death, a bug is raised as itself, never retried as a fault
    with pytest.raises(ValueError, match="a bug, not a fault"):
        FaultHandler(3, {"critic": lambda i: None}).retrying(lambda: gather([healthy.fail.remote()], "critic"))
