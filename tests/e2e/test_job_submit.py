"""`ray job submit` of the tiny pipeline to a real local cluster started with `ray start --head`
(the package's `cluster` fixture)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import submit_job

REPO = Path(__file__).resolve().parents[2]

# The whole pipeline, shortened: a 1-layer model and a handful of steps per stage.
SHORT = [
    "model.tiny.vocab_size=400", "model.tiny.n_layer=1", "model.tiny.n_head=2", "model.tiny.n_embd=32",
    "model.tiny.n_positions=96", "model.context_length=96", "model.max_prompt_tokens=64",
    "model.max_response_tokens=8", "data.synthetic.num_demonstrations=64", "data.synthetic.num_comparisons=32",
    "data.synthetic.num_prompts=32", "data.synthetic.num_pretrain_docs=200", "data.synthetic.num_eval_prompts=16",
    "data.synthetic.num_eval_comparisons=16", "data.synthetic.policy_comparisons=8",
    "eval.num_prompts=16", "eval.num_pretrain_docs=40", "pretrain.steps=4", "pretrain.batch_size=8",
    "pretrain.seq_len=32", "sft.epochs=1", "sft.batch_size=16", "rm.batch_size=8",
    "ppo.episodes=16", "ppo.batch_size=16", "ppo.minibatch_size=8", "ppo.ptx_seq_len=32", "ppo.ptx_ratio=1",
]


@pytest.mark.e2e
def test_tiny_pipeline_job_succeeds_and_fills_the_run_dir(cluster, tmp_path):
    address, env = cluster
    run_dir = tmp_path / "run"
    runtime_env = {"excludes": [".venv", ".git", "runs", "bench/results", "**/__pycache__", ".pytest_cache",
                                ".hypothesis"]}
    proc = submit_job(address, env, ["python", "-m", "orchestration.cli", "run", "configs/tiny.yaml",
                                     f"run.output_dir={run_dir}", *SHORT],
                      "--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "succeeded" in (proc.stdout + proc.stderr)
    for stage in ("pretrain", "sft", "rm", "ppo", "ppo_noptx"):
        assert (run_dir / stage / "final" / "COMPLETE").exists(), stage
    assert (run_dir / "config.yaml").exists()
    assert (run_dir / "report.md").exists()
    assert (run_dir / "eval" / "results.json").exists()
