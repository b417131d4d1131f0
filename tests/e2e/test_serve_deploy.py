"""The endpoint deployed Ray Serve's own way: `serve run` of a Serve config file whose
application is `orchestration.serve.deploy:app_builder`, answered through the real
`openai` client. `serve run -a local` starts its own Ray instance (never a shared one)
and takes it down on Ctrl-C, which the test sends to its process group only.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from orchestration.serve.deploy import app_builder
from rlhf.config import ConfigError
from .conftest import CONTEXT, TEXTS, _free_port, _wait_healthy

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def test_builder_args_are_checked_before_anything_starts(tmp_path):
    with pytest.raises(ConfigError, match="target"):
        app_builder({})
    with pytest.raises(ConfigError, match="serve.port"):
        app_builder({"target": str(tmp_path), "serve.port": "not-a-port"})
    with pytest.raises(FileNotFoundError, match="neither a run directory"):
        app_builder({"target": str(tmp_path)})


def test_serve_run_of_a_serve_config_file_answers_openai_requests(tmp_path):
    import openai

    from rlhf.tiny import make_tiny_base

    checkpoint = make_tiny_base(tmp_path / "policy", TEXTS, vocab_size=300, n_positions=CONTEXT,
                                n_embd=32, n_layer=2, n_head=2)
    port = _free_port()
    shipped = yaml.safe_load((Path(__file__).parents[2] / "configs/serve/instructray.yaml").read_text())
    shipped["http_options"]["port"] = port
    app = shipped["applications"][0]
    app["args"] |= {"target": str(checkpoint), "serve.max_tokens_limit": 16}
    config_file = tmp_path / "serve.yaml"
    config_file.write_text(yaml.safe_dump(shipped))
    proc = subprocess.Popen([str(BIN / "serve"), "run", "-a", "local", str(config_file)],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": ""})
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, timeout_s=240)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["policy"]
        out = client.completions.create(model="policy", prompt="the quick brown", max_tokens=8, seed=1)
        assert out.model == "policy" and out.usage.completion_tokens >= 1
        with pytest.raises(openai.BadRequestError, match="max_tokens"):  # the args' serve.* override took
            client.completions.create(model="policy", prompt="the quick brown", max_tokens=17)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _serve(cli: list[str], address: str, env: dict, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "serve"), *cli, "--address", address], env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.e2e
def test_serve_deploy_onto_a_running_cluster_then_status_and_shutdown(cluster, tmp_path):
    import openai

    from rlhf.tiny import make_tiny_base

    address, env = cluster
    checkpoint = make_tiny_base(tmp_path / "policy", TEXTS, vocab_size=300, n_positions=CONTEXT,
                                n_embd=32, n_layer=2, n_head=2)
    port = _free_port()
    shipped = yaml.safe_load((Path(__file__).parents[2] / "configs/serve/instructray.yaml").read_text())
    shipped["http_options"]["port"] = port
    shipped["applications"][0]["args"]["target"] = str(checkpoint)
    config_file = tmp_path / "serve.yaml"
    config_file.write_text(yaml.safe_dump(shipped))
    deployed = _serve(["deploy", str(config_file)], address, env)
    assert deployed.returncode == 0, deployed.stdout[-2000:] + deployed.stderr[-2000:]
    try:
        deadline, status = time.time() + 300, ""
        while time.time() < deadline:  # deploy returns at once; the app comes up behind it
            status = _serve(["status"], address, env).stdout
            if yaml.safe_load(status or "{}").get("applications", {}).get("instructray", {}).get("status") \
                    == "RUNNING":
                break
            time.sleep(2)
        app = yaml.safe_load(status)["applications"]["instructray"]
        assert app["status"] == "RUNNING", status
        assert all(d["status"] == "HEALTHY" for d in app["deployments"].values()), status
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        out = client.completions.create(model="policy", prompt="the quick brown", max_tokens=4, seed=1)
        assert out.usage.completion_tokens >= 1
    finally:
        down = _serve(["shutdown", "--yes"], address, env)
    assert down.returncode == 0, down.stderr[-2000:]
    after = _serve(["status"], address, env).stdout
    assert "instructray" not in (yaml.safe_load(after or "{}") or {}).get("applications", {}), after
