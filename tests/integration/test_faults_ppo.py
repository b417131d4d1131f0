"""Faults injected for real into PPO runs, each compared with an uninterrupted run of the same seed.

- actors SIGKILLed (their worker process) as the driver enters a phase: a generator
  mid-generation, the reward and reference scorers and a critic rank mid-scoring, a
  critic rank mid-training, a policy-learner rank mid-training (-> rewind to the last
  checkpoint);
- the driver process SIGKILLed mid-iteration, then again mid-checkpoint-write, and
  resumed with `instructray ppo --resume`.
Every run must end with exactly the uninterrupted run's metrics, bit for bit, except
wall-clock ones and the restart counters: nothing lost, nothing done twice.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import ray

from orchestration.ppo.trainer import PPOTrainer
from orchestration.rundir import StageDir, read_metrics
from orchestration.stages import ppo
from tests.integration.conftest import FAULT_RUN, assert_same_run

pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def make_run(ray_local, tiny_config, tiny_ppo_inputs, tmp_path_factory):
    def make(name: str):
        root = tmp_path_factory.mktemp(name)
        cfg = tiny_config(root, *FAULT_RUN)
        tiny_ppo_inputs(root, cfg)
        return cfg
    return make


@pytest.fixture(scope="module")
def reference(fault_reference):
    rows = fault_reference[1]
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3]
    return rows


# ---------------------------------------------------------------- actors killed


def _ask_pid(actor) -> ray.ObjectRef:
    def pid(_instance) -> int:  # nested: pickled by value, the workers cannot import this module
        import os
        return os.getpid()
    return actor.__ray_call__.remote(pid)


class Killer(threading.Thread):
    """SIGKILLs actor processes of a running trainer as it enters scheduled (iteration, phase)s.

    Pids are asked for as soon as an actor appears (without blocking, so no phase is
    missed); each kill waits `delay` seconds into its phase, so the call is in flight.
    """

    def __init__(self, trainer: PPOTrainer, schedule: dict[tuple[int, str], list[tuple[str, int, float]]]):
        super().__init__(daemon=True)
        self.trainer, self.schedule = trainer, dict(schedule)
        self.killed: list[dict] = []
        self.stop = threading.Event()
        self._pids: dict[str, int] = {}
        self._asking: dict[str, ray.ObjectRef] = {}

    def _actor(self, role: str, index: int):
        return self.trainer.team.handles(role)[index]

    def _refresh_pids(self) -> None:
        team = self.trainer.team
        for actor in [a for role in ("generator", "reward", "reference", "learner", "critic")
                      for a in team.handles(role)]:
            key = actor._actor_id.hex()
            if key not in self._pids and key not in self._asking:
                self._asking[key] = _ask_pid(actor)
        if self._asking:
            ready, _ = ray.wait(list(self._asking.values()), num_returns=len(self._asking), timeout=0)
            for key, ref in list(self._asking.items()):
                if ref in ready:
                    del self._asking[key]
                    try:
                        self._pids[key] = ray.get(ref)
                    except ray.exceptions.RayError:
                        pass  # died before it answered

    def run(self) -> None:
        while self.schedule and not self.stop.is_set():
            self._refresh_pids()
            where = self.trainer.phase
            for role, index, delay in self.schedule.pop(where, []):
                actor = self._actor(role, index)
                pid = self._pids.get(actor._actor_id.hex())
                assert pid is not None, f"no pid yet for {role} {index}"
                time.sleep(delay)
                os.kill(pid, signal.SIGKILL)
                self.killed.append({"iteration": where[0], "phase": where[1], "role": role, "index": index})
            time.sleep(0.001)


# What is killed when: every role, in the phase where it is busy.
SCHEDULE = {
    (0, "generate"): [("generator", 1, 0.03)],
    (1, "score"): [("reward", 0, 0.0), ("critic", 1, 0.0)],  # critic: replays iteration 0
    (2, "score"): [("reference", 0, 0.0)],
    (2, "learn"): [("critic", 0, 0.03)],
    (3, "learn"): [("learner", 1, 0.03)],  # -> rewind to the checkpoint after iteration 2
}


@pytest.fixture(scope="module")
def chaos(make_run):
    cfg = make_run("chaos")
    stage = StageDir(cfg.output_dir, "ppo")
    trainer = PPOTrainer(cfg, stage, ppo.inputs(cfg), cfg.ppo.ptx_coef)
    killer = Killer(trainer, SCHEDULE)
    killer.start()
    try:
        final = trainer.run()
    finally:
        killer.stop.set()
        trainer.shutdown()
    return {"rows": read_metrics(stage.metrics_file), "events": trainer.team.faults.events,
            "killed": killer.killed, "final": final}


def test_every_kill_landed_in_its_phase_and_was_restarted_there(chaos):
    expected = [{"iteration": k, "phase": ph, "role": role, "index": i}
                for (k, ph), kills in SCHEDULE.items() for role, i, _ in kills]
    assert chaos["killed"] == expected
    events = [{k: e[k] for k in ("iteration", "phase", "role", "index")} for e in chaos["events"]]
    assert sorted(events, key=str) == sorted(expected, key=str)
    assert all(e["error"] == "ActorDiedError" for e in chaos["events"])


def test_generator_killed_mid_generation_the_batch_is_complete_and_current(chaos, reference):
    rows = chaos["rows"]
    assert rows[0]["generator_restarts"] == 1
    # the retried shard was sampled with v_0 (else the learner would have refused it) ...
    assert [r["weight_version"] for r in rows] == [0, 1, 2, 3]
    # ... and every generator ends each iteration on the learner's weights
    assert all(r["synced_generators"] == 2 for r in rows)
    # the batch is the uninterrupted one: same episodes, same samples, same scores
    for key in ("episodes", "response_length", "rm_score_mean", "gold_score", "synced_checksum"):
        assert rows[0][key] == reference[0][key]


def test_scorers_killed_mid_scoring_are_restarted_in_place(chaos):
    rows = chaos["rows"]
    assert (rows[1]["reward_restarts"], rows[1]["critic_restarts"]) == (1, 1)
    assert rows[-1]["reference_restarts"] == 1 and rows[-1]["critic_restarts"] == 2
    assert all(r["learner_restarts"] == 0 for r in rows[:2])  # no rewind for a scorer


def test_learner_killed_rewinds_to_the_last_checkpoint(chaos):
    rows = chaos["rows"]
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3]  # each once; 2 and 3 redone
    assert [r["learner_restarts"] for r in rows] == [0, 0, 1, 1]
    assert (chaos["final"] / "COMPLETE").exists()


def test_faulted_run_equals_the_uninterrupted_run(chaos, reference):
    assert_same_run(chaos["rows"], reference)


def test_generation_stays_within_the_token_budget(reference):
    for r in reference:
        assert 0 < r["generation_peak_tokens"] <= 64  # ppo.generation_token_budget
        assert r["generation_passes"] > 2  # 16 prompts over 2 generators: really split


# ---------------------------------------------------------------- the driver killed


def _driver(ray_local, cfg_file, resume: bool, **env) -> subprocess.Popen:
    """`instructray ppo CONFIG [--resume]` in a new process on the test's Ray cluster."""
    args = [sys.executable, "-m", "orchestration.cli", "ppo", str(cfg_file)] + (["--resume"] if resume else [])
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, **env}
    return subprocess.Popen(args, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 300.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = condition()
        if found:
            return found
        assert proc.poll() is None, f"the driver exited (rc {proc.returncode}) before {what}"
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def _sigkill(proc: subprocess.Popen, ray_local) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # Ray ends a dead driver's actors; wait for that, so nothing of it writes any more.
    deadline = time.time() + 120
    while ray_local.available_resources().get("CPU", 0) < 2 - 1e-6 and time.time() < deadline:
        time.sleep(0.1)


def test_driver_killed_mid_iteration_and_mid_checkpoint_resumes_exactly(make_run, ray_local, reference, tmp_path):
    cfg = make_run("driver")
    cfg_file = tmp_path / "config.yaml"
    cfg_file.write_text(cfg.to_yaml())
    stage = StageDir(cfg.output_dir, "ppo")
    step2 = stage.checkpoints / "step_00000002"

    # 1. SIGKILL once the checkpoint after iteration 2 is complete: mid-iteration 2.
    proc = _driver(ray_local, cfg_file, resume=False)
    _wait_for(lambda: (step2 / "COMPLETE").exists(), proc, "checkpoint step 2")
    _sigkill(proc, ray_local)
    assert [r["iteration"] for r in read_metrics(stage.metrics_file)] == [0, 1]  # iteration 2 unfinished

    # 2. `--resume`, SIGKILLed while it writes the next checkpoint (paused after its first file).
    proc = _driver(ray_local, cfg_file, resume=True, INSTRUCTRAY_TEST_CHECKPOINT_PAUSE_S="600")
    half = _wait_for(lambda: [p for p in stage.checkpoints.glob(".step_00000004.tmp-*")
                              if (p / "policy.pt").exists()], proc, "the half-written checkpoint")[0]
    _sigkill(proc, ray_local)
    assert not (half / "COMPLETE").exists() and half.exists()
    assert stage.latest_checkpoint() == step2 and not stage.is_done()
    # A folder that looks like a newer checkpoint but was never completed: must be ignored too.
    fake = stage.checkpoints / "step_00000003"
    fake.mkdir()
    (fake / "policy.pt").write_bytes(b"not a checkpoint")
    killed_at = time.time()

    # 3. `--resume` again, to the end.
    finals = ppo.main(cfg, resume=True)
    rows = read_metrics(stage.metrics_file)
    assert_same_run(rows, reference)
    assert [r["time"] > killed_at for r in rows] == [False, False, True, True]  # 2, 3 redone from step 2
    assert not half.exists()  # the half-written checkpoint was removed, never loaded
    assert (finals[0] / "COMPLETE").exists() and stage.is_done()
