"""`ray job submit` of the tiny pipeline to a real local cluster started with `ray start --head`.

Ray 2.60 turns token authentication on by default: the client needs
RAY_AUTH_MODE=token (the token is in ~/.ray/auth_token). The cluster is bound to
127.0.0.1 and stopped at the end, whatever happens.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

# The whole pipeline, shortened: a 1-layer model and a handful of steps per stage.
SHORT = [
    "model.tiny.vocab_size=400", "model.tiny.n_layer=1", "model.tiny.n_head=2", "model.tiny.n_embd=32",
    "model.tiny.n_positions=96", "model.context_length=96", "model.max_prompt_tokens=64",
    "model.max_response_tokens=8", "data.synthetic.num_demonstrations=64", "data.synthetic.num_comparisons=32",
    "data.synthetic.num_prompts=32", "data.synthetic.num_pretrain_docs=200", "data.synthetic.num_eval_prompts=16",
    "eval.num_prompts=16", "eval.num_pretrain_docs=40", "pretrain.steps=4", "pretrain.batch_size=8",
    "pretrain.seq_len=32", "sft.epochs=1", "sft.batch_size=16", "rm.batch_size=8",
    "ppo.episodes=16", "ppo.batch_size=16", "ppo.minibatch_size=8", "ppo.ptx_seq_len=32", "ppo.ptx_ratio=1",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    dash = _free_port()
    start = [str(BIN / "ray"), "start", "--head", "--num-cpus", "2", "--node-ip-address", "127.0.0.1",
             "--port", str(_free_port()), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
             "--include-dashboard", "true", "--disable-usage-stats"]
    subprocess.run(start, env=env, check=True, capture_output=True, timeout=120)
    try:
        yield f"http://127.0.0.1:{dash}", env
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)


@pytest.mark.e2e
def test_tiny_pipeline_job_succeeds_and_fills_the_run_dir(cluster, tmp_path):
    address, env = cluster
    run_dir = tmp_path / "run"
    runtime_env = {"excludes": [".venv", ".git", "runs", "bench/results", "**/__pycache__"]}
    submit = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO),
              "--runtime-env-json", json.dumps(runtime_env), "--",
              "python", "-m", "orchestration.cli", "run", "configs/tiny.yaml",
              f"run.output_dir={run_dir}", *SHORT]
    proc = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "succeeded" in (proc.stdout + proc.stderr)
    for stage in ("pretrain", "sft", "rm", "ppo", "ppo_noptx"):
        assert (run_dir / stage / "final" / "COMPLETE").exists(), stage
    assert (run_dir / "config.yaml").exists()
    assert (run_dir / "report.md").exists()
    assert (run_dir / "eval" / "results.json").exists()
