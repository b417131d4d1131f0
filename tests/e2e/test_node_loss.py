"""Machines lost mid-run, for real: `ray start` nodes on this machine, killed by their processes.

1. A node: a head (`trainer_node`) and a second node (`rollout_node`), each a `ray start
   --block` with its own temp dir; the generators and scorers ask for `rollout_node`
   (resources.role_resources), the learners for `trainer_node`. Every process of the
   second node is SIGKILLed mid-run: the driver loses those actors, says it waits for a
   node offering `rollout_node`, and once a new one joins, finishes with exactly the
   uninterrupted run's metrics (wall clock and restart counters apart).
2. The head, under a `ray job submit` job: every process of the cluster and the job's
   driver are SIGKILLed after the first checkpoint; a new cluster is started and the job
   resubmitted with `--resume`, which continues from the checkpoint on storage to the
   same metrics.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from orchestration.rundir import StageDir, read_metrics
from rlhf.config import load_config
from tests.integration.conftest import TINY, _write_tiny_ppo_inputs, assert_same_run

from .conftest import _free_port, _signal_processes_naming, cluster_env, ray_start, submit_job

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# 4 iterations of 16 episodes on two generators; checkpoints after iterations 2 and 4.
RUN = [*TINY, "ppo.episodes=64", "ppo.batch_size=16", "ppo.minibatch_size=8", "ppo.num_generators=2",
       "ppo.checkpoint_every=2", "ppo.compare_ptx=false", "ppo.ptx_seq_len=32", "ppo.ptx_ratio=2",
       "ppo.max_restarts=8", "data.synthetic.num_prompts=64", "data.synthetic.num_pretrain_docs=200",
       "resources.role_resources={generator: {rollout_node: 0.01}, reward: {rollout_node: 0.01}, "
       "reference: {rollout_node: 0.01}, critic: {trainer_node: 0.01}, learner: {trainer_node: 0.01}}"]
# The GCS declares a silent node dead after period x threshold; 15 s by default.
FAST_DEATH = {"RAY_health_check_period_ms": "500", "RAY_health_check_failure_threshold": "4"}


class Node:
    """One `ray start --block` in its own session: its processes are found by its temp dir."""

    def __init__(self, env: dict, **start):
        self.temp_dir = tempfile.mkdtemp(prefix="ray-node-", dir="/tmp")  # short: socket paths live here
        self.log = Path(self.temp_dir) / "start.log"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(ray_start(self.temp_dir, block=True, **start), env=env,
                                         start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while "Ray runtime started" not in self.log.read_text():
            assert self.proc.poll() is None and time.time() < deadline, self.log.read_text()[-3000:]
            time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL, all at once: the node is gone, as if its machine had died."""
        _signal_processes_naming(self.temp_dir, signal.SIGKILL)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def remove(self) -> None:
        self.kill()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def two_nodes():
    env, port = cluster_env(), _free_port()
    address = f"127.0.0.1:{port}"
    nodes = [Node({**env, **FAST_DEATH}, port=port, resources={"trainer_node": 1})]
    try:
        nodes.append(Node(env, address=address, resources={"rollout_node": 1}))
        yield address, env, nodes
    finally:
        for node in reversed(nodes):
            node.remove()


def _config(root: Path) -> Path:
    cfg = load_config("tiny", [*RUN, f"run.output_dir={root}"])
    _write_tiny_ppo_inputs(root, cfg)
    path = root / "config.yaml"
    path.write_text(cfg.to_yaml())
    return path


def _driver(address: str, env: dict, cfg_file: Path, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "orchestration.cli", "ppo", str(cfg_file)],
                                env={**env, "RAY_ADDRESS": address}, start_new_session=True,
                                stdout=out, stderr=subprocess.STDOUT)


def _wait_for(condition, proc: subprocess.Popen, log: Path, what: str, timeout: float = 300.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        assert proc.poll() is None, f"the driver exited (rc {proc.returncode}) before {what}:\n" + \
            log.read_text()[-4000:]
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}:\n" + log.read_text()[-4000:])


@pytest.fixture(scope="module")
def reference(two_nodes, tmp_path_factory):
    address, env, _ = two_nodes
    root = tmp_path_factory.mktemp("reference")
    log = root / "driver.log"
    proc = _driver(address, env, _config(root), log)
    assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]
    rows = read_metrics(StageDir(root, "ppo").metrics_file)
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3]
    return rows


def test_a_lost_node_is_waited_for_and_the_run_ends_as_if_nothing_happened(two_nodes, reference, tmp_path):
    address, env, nodes = two_nodes
    log = tmp_path / "driver.log"
    metrics = StageDir(tmp_path, "ppo").metrics_file
    proc = _driver(address, env, _config(tmp_path), log)
    _wait_for(lambda: metrics.exists() and len(read_metrics(metrics)) >= 1, proc, log, "iteration 0")
    nodes.pop().remove()  # mid-iteration 1 (or 2): generators and both scorers die with it
    _wait_for(lambda: "which no alive node offers" in log.read_text(), proc, log, "the wait for a node")
    assert proc.poll() is None
    nodes.append(Node(env, address=address, resources={"rollout_node": 1}))
    assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]

    rows = read_metrics(metrics)
    assert_same_run(rows, reference)
    last = rows[-1]
    assert last["generator_restarts"] >= 1, last  # the ones that died were replaced, not resurrected
    assert last["learner_restarts"] == 0 and last["critic_restarts"] == 0  # the head's actors lived on
    assert "rollout_node" in log.read_text()


def test_a_lost_head_resubmitted_with_resume_continues_from_the_checkpoint(reference, tmp_path):
    env, port = cluster_env(), _free_port()
    cfg_file = _config(tmp_path)
    stage = StageDir(tmp_path, "ppo")
    entry = ["python", "-m", "orchestration.cli", "ppo", str(cfg_file)]
    both = {"trainer_node": 1, "rollout_node": 1}  # one machine offering what both nodes did

    dash = _free_port()
    head = Node(env, port=port, dashboard_port=dash, num_cpus=4, resources=both)
    try:
        proc = submit_job(f"http://127.0.0.1:{dash}", env, entry, "--no-wait")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        deadline = time.time() + 600
        while not (stage.checkpoints / "step_00000002" / "COMPLETE").exists():
            assert time.time() < deadline, "no checkpoint within 600 s"
            time.sleep(0.05)
        _signal_processes_naming(str(cfg_file), signal.SIGKILL)  # the job's driver dies with its machine
    finally:
        head.remove()
    killed_at = time.time()
    assert not stage.is_done()

    dash = _free_port()
    head = Node(env, port=_free_port(), dashboard_port=dash, num_cpus=4, resources=both)
    try:
        proc = submit_job(f"http://127.0.0.1:{dash}", env, [*entry, "--resume"])
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    finally:
        head.remove()
    rows = read_metrics(stage.metrics_file)
    assert_same_run(rows, reference)
    assert [r["time"] > killed_at for r in rows] == [False, False, True, True]  # 2-3 redone from step 2
    assert stage.is_done()
