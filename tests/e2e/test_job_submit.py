"""`ray job submit` of the tiny pipeline to a real local cluster started with `ray start --head`.

Ray 2.60 turns token authentication on by default: the client needs
RAY_AUTH_MODE=token (the token is in ~/.ray/auth_token). The cluster is bound to
127.0.0.1 and stopped at the end, whatever happens: only its own processes (found by
its private temp dir), never `ray stop`, which would end every Ray instance on the
machine, a user's running pipeline included.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
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
    "data.synthetic.num_eval_comparisons=16",
    "eval.num_prompts=16", "eval.num_pretrain_docs=40", "pretrain.steps=4", "pretrain.batch_size=8",
    "pretrain.seq_len=32", "sft.epochs=1", "sft.batch_size=16", "rm.batch_size=8",
    "ppo.episodes=16", "ppo.batch_size=16", "ppo.minibatch_size=8", "ppo.ptx_seq_len=32", "ppo.ptx_ratio=1",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes_naming(text: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text.encode() in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            pass  # gone meanwhile
    return pids


def _stop_cluster(temp_dir: str) -> None:
    """SIGTERM, then SIGKILL, every process of the cluster whose files live in temp_dir."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        for pid in _processes_naming(temp_dir):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace
        while _processes_naming(temp_dir) and time.time() < deadline:
            time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster():
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    dash = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray-e2e-", dir="/tmp")  # short: Ray's socket paths live under it
    start = [str(BIN / "ray"), "start", "--head", "--num-cpus", "2", "--node-ip-address", "127.0.0.1",
             "--port", str(_free_port()), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
             "--include-dashboard", "true", "--disable-usage-stats", "--temp-dir", temp_dir]
    # Every port a head binds, chosen free: another Ray instance on this machine (a user's
    # pipeline) holds the defaults, and a job agent that cannot bind 52365 never registers.
    for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port",
                 "--runtime-env-agent-port", "--ray-client-server-port", "--node-manager-port",
                 "--object-manager-port"):
        start += [flag, str(_free_port())]
    try:
        subprocess.run(start, env=env, check=True, capture_output=True, timeout=120)
        yield f"http://127.0.0.1:{dash}", env
    finally:
        _stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.e2e
def test_tiny_pipeline_job_succeeds_and_fills_the_run_dir(cluster, tmp_path):
    address, env = cluster
    run_dir = tmp_path / "run"
    runtime_env = {"excludes": [".venv", ".git", "runs", "bench/results", "**/__pycache__", ".pytest_cache",
                                ".hypothesis"]}
    submit = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO),
              "--runtime-env-json", json.dumps(runtime_env), "--",
              "python", "-m", "orchestration.cli", "run", "configs/tiny.yaml",
              f"run.output_dir={run_dir}", *SHORT]
    # Right after `ray start` the head may not have a job agent yet ("No available agent to
    # submit job, please try again later"): the submission is refused, nothing runs; retry.
    # On a loaded machine the agent process has taken over two minutes to register.
    deadline = time.time() + 420
    while True:
        proc = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=900)
        if "No available agent" not in proc.stdout + proc.stderr or time.time() > deadline:
            break
        time.sleep(3)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "succeeded" in (proc.stdout + proc.stderr)
    for stage in ("pretrain", "sft", "rm", "ppo", "ppo_noptx"):
        assert (run_dir / stage / "final" / "COMPLETE").exists(), stage
    assert (run_dir / "config.yaml").exists()
    assert (run_dir / "report.md").exists()
    assert (run_dir / "eval" / "results.json").exists()
