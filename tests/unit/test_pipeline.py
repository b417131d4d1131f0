"""The pipeline runner: enabled steps in order, complete ones skipped, results and config written."""
import json

from orchestration import pipeline
from orchestration.pipeline import Step
from rlhf.config import load_config


def test_runs_enabled_steps_in_order_and_skips_complete_ones(tmp_path):
    cfg = load_config("tiny", [f"run.output_dir={tmp_path}"])
    ran = []

    def step(name, enabled=True, done=False):
        return Step(name, lambda c: enabled, lambda c: done,
                    lambda c, resume: ran.append((name, resume)) or {"n": len(ran)})

    steps = [step("a"), step("off", enabled=False), step("finished", done=True), step("b")]
    results = pipeline.main(cfg, resume=True, steps=steps)
    assert ran == [("a", True), ("b", True)]
    assert results["a"]["n"] == 1 and results["b"]["n"] == 2 and results["b"]["wall_s"] >= 0
    assert json.loads((tmp_path / "pipeline.json").read_text())["b"]["n"] == 2
    assert (tmp_path / "config.yaml").exists()


def test_default_steps_follow_the_paper_order():
    assert [s.name for s in pipeline.STEPS] == ["pretrain", "sft", "rm", "sft_select", "ppo_init_sft", "ppo", "eval"]
    cfg = load_config("tiny", ["rm.enabled=false"])
    enabled = [s.name for s in pipeline.STEPS if s.enabled(cfg)]
    assert "sft_select" not in enabled and "rm" not in enabled  # no RM, no selection by RM
