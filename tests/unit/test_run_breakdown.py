"""bench/run_breakdown.py: a stage's loop from its metrics' time stamps, the rest from its wall time."""
from __future__ import annotations

import importlib.util
import json

import pytest

from rlhf.config import REPO_ROOT


@pytest.fixture(scope="module")
def rb():
    spec = importlib.util.spec_from_file_location("run_breakdown", REPO_ROOT / "bench" / "run_breakdown.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _metrics(path, stamps, validation_at=None, validated_after=None):
    path.mkdir(parents=True)
    rows = [{"step": i + 1, "time": t, "loss": 1.0} for i, t in enumerate(stamps)]
    if validation_at is not None:  # the untrained model's validation row is not a step
        rows.insert(0, {"step": 0, "time": validation_at, "val_loss": 7.0})
    if validated_after is not None:  # nor is an epoch's validation (the RM logs accuracies, no val_loss)
        rows.append({"step": len(stamps), "time": validated_after, "epoch": 1, "val_noisy_accuracy": 0.7})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_a_run_splits_into_loops_and_the_rest(tmp_path, rb):
    run = tmp_path / "tiny"
    run.mkdir()
    (run / "pipeline.json").write_text(json.dumps({
        "pretrain": {"wall_s": 30.0, "steps": 4}, "sft": {"wall_s": 20.0},
        "ppo": {"wall_s": 50.0, "finals": {}}, "eval": {"wall_s": 5.0}}))
    _metrics(run / "pretrain", [100.0, 102.0, 104.0, 106.0], validation_at=90.0)  # 3 gaps of 2 s, 4 steps: 8 s
    _metrics(run / "sft", [10.0, 15.0], validated_after=19.0)                     # 1 gap of 5 s, 2 steps: 10 s
    _metrics(run / "ppo", [0.0, 3.0, 6.0])                                        # 9 s
    _metrics(run / "ppo_noptx", [50.0, 52.0, 54.0, 56.0, 58.0])                  # 10 s
    rows = {r["stage"]: r for r in rb.breakdown(run)}
    assert rows["pretrain"]["loop_s"] == pytest.approx(8.0)
    assert rows["pretrain"]["rest_s"] == pytest.approx(22.0)
    assert rows["sft"]["loop_s"] == pytest.approx(10.0)
    assert rows["ppo"]["loop_s"] == pytest.approx(19.0)  # PPO-ptx and plain PPO, each its own span
    assert rows["eval"]["loop_s"] == 0.0 and rows["eval"]["rest_s"] == pytest.approx(5.0)
    assert rows["total"]["wall_s"] == pytest.approx(105.0)
    assert rows["total"]["loop_s"] == pytest.approx(37.0)
    assert rows["total"]["rest_s"] == pytest.approx(68.0)
