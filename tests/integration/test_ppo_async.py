"""Asynchronous rollouts (`ppo.async_rollouts`) on real actors: batches sampled ahead while the
learners train, within the staleness bound, corrected, and as recoverable as the synchronous loop.

The runs are those of test_faults_ppo.py (4 iterations of 16 episodes, 2 generators, 2 learners,
checkpoints after iterations 2 and 4) with async rollouts on.
"""
from __future__ import annotations

import math

import pytest

from orchestration.ppo.trainer import PPOTrainer
from orchestration.rundir import StageDir, read_metrics
from orchestration.stages import ppo
from tests.integration.conftest import FAULT_RUN, assert_same_run
from tests.integration.test_faults_ppo import Killer, _driver, _sigkill, _wait_for

pytestmark = pytest.mark.slow

ASYNC_RUN = FAULT_RUN + ["ppo.async_rollouts=true", "ppo.probe_prompts=8"]


@pytest.fixture(scope="module")
def make_run(ray_local, tiny_config, tiny_ppo_inputs, tmp_path_factory):
    def make(name: str, *overrides: str):
        root = tmp_path_factory.mktemp(name)
        cfg = tiny_config(root, *ASYNC_RUN, *overrides)
        tiny_ppo_inputs(root, cfg)
        return cfg
    return make


def _run(cfg) -> list[dict]:
    ppo.main(cfg)
    return read_metrics(StageDir(cfg.output_dir, "ppo").metrics_file)


@pytest.fixture(scope="module")
def reference(make_run):
    return _run(make_run("async"))


def test_each_rollout_is_one_version_behind_and_carries_its_correction(reference):
    rows = reference
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3]
    # rollout k was sampled with v_{k-1} while the learners made v_k (the first with v_0)
    assert [r["weight_version"] for r in rows] == [0, 0, 1, 2]
    assert [r["rollout_staleness"] for r in rows] == [0, 1, 1, 1]
    # the sync that installed a rollout's weights was verified on both generators
    assert [r["synced_version"] for r in rows] == [0, 0, 1, 2]
    assert all(r["synced_generators"] == 2 for r in rows)
    assert "behaviour_weight_mean" not in rows[0]  # on-policy: the paper's loss, no weights
    for r in rows[1:]:
        # the weights pi_old / pi_sampler average 1 over the sampler's tokens when the sampler's
        # logprobs are right; the old policy really differs from the sampler's (a rounding
        # error apart in row 0, where they are the same weights)
        assert abs(r["behaviour_weight_mean"] - 1) < 0.1 and r["behaviour_weight_max"] > 1.0
        assert r["sampler_learner_logprob_gap"] > 100 * rows[0]["sampler_learner_logprob_gap"]
        assert 0 <= r["behaviour_weights_truncated"] < 0.5
    for r in rows:
        assert math.isfinite(r["gold_score"]) and math.isfinite(r["kl_per_sequence"])
        assert 0 <= r["heldout_gold_score"] <= 1 and r["skipped_steps"] == 0


def test_a_deeper_pipeline_stays_within_its_bound(make_run):
    rows = _run(make_run("async2", "ppo.max_staleness=2"))
    assert [r["weight_version"] for r in rows] == [0, 0, 0, 1]
    assert [r["rollout_staleness"] for r in rows] == [0, 1, 2, 2]


def test_the_learner_refuses_a_rollout_beyond_the_bound(make_run):
    cfg = make_run("bound")
    trainer = PPOTrainer(cfg, StageDir(cfg.output_dir, "ppo"), ppo.inputs(cfg), cfg.ppo.ptx_coef)
    try:
        trainer.team.sync()
        trainer.step(0)
        trainer.step(1)  # the learners are at v_2 now
        rollout = trainer.team.generators.sample(trainer.prompts.take(16), seed=0)  # still v_1 there
        exp, _ = trainer.score(rollout.replace(weight_version=0), k=2)
        with pytest.raises(Exception, match="at most 1 versions behind"):
            trainer.learn(exp, 2)
        exp, stats = trainer.score(rollout, k=2)
        assert stats["rollout_staleness"] == 1 and trainer.learn(exp, 2)["skipped_steps"] == 0
    finally:
        trainer.shutdown()


def test_a_generator_killed_while_sampling_ahead_changes_nothing(make_run, reference):
    cfg = make_run("async_chaos")
    stage = StageDir(cfg.output_dir, "ppo")
    trainer = PPOTrainer(cfg, stage, ppo.inputs(cfg), cfg.ppo.ptx_coef)
    # During learn(1) generator 1 samples rollout 2 with v_1; it is retried with v_1, not v_2.
    killer = Killer(trainer, {(1, "learn"): [("generator", 1, 0.0)]})
    killer.start()
    try:
        trainer.run()
    finally:
        killer.stop.set()
        trainer.shutdown()
    rows = read_metrics(stage.metrics_file)
    assert killer.killed and rows[-1]["generator_restarts"] == 1
    assert_same_run(rows, reference)


def test_async_run_killed_mid_iteration_resumes_exactly(make_run, ray_local, reference, tmp_path):
    cfg = make_run("async_driver")
    cfg_file = tmp_path / "config.yaml"
    cfg_file.write_text(cfg.to_yaml())
    stage = StageDir(cfg.output_dir, "ppo")
    proc = _driver(ray_local, cfg_file, resume=False)
    _wait_for(lambda: (stage.checkpoints / "step_00000002" / "COMPLETE").exists(), proc, "checkpoint step 2")
    _sigkill(proc, ray_local)
    assert len(read_metrics(stage.metrics_file)) == 2
    # the checkpoint holds rollout 2, sampled ahead with v_1: weights it does not otherwise keep
    proc = _driver(ray_local, cfg_file, resume=True)
    assert proc.wait(timeout=300) == 0
    assert_same_run(read_metrics(stage.metrics_file), reference)
