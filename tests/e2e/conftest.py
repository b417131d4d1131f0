"""A real OpenAI-compatible endpoint for the serve tests.

One Ray Serve application on a free loopback port, serving a tiny GPT-2 built
here in a temporary directory, with an API key configured. Scoped to this
package: it starts with the first test that asks for it and is shut down (Serve,
and Ray if we started it) after the last e2e test, so later suites get the CPUs back.

Also a real cluster of its own (`ray start --head`) for `ray job submit` and
`serve deploy`. Ray 2.60 turns token authentication on by default: clients need
RAY_AUTH_MODE=token (the token is in ~/.ray/auth_token). The cluster is bound to
127.0.0.1 and stopped at the end, whatever happens: only its own processes (found
by its private temp dir), never `ray stop`, which would end every Ray instance on
the machine, a user's running pipeline included.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

BIN = Path(sys.executable).parent
MODEL = "tiny-e2e"
API_KEY = "sk-e2e-test-key"
CONTEXT = 96           # n_positions of the test model
MAX_TOKENS_LIMIT = 48  # serve.max_tokens_limit
MAX_BODY_BYTES = 16384
TEXTS = [f"the quick brown fox jumps over the lazy dog {i}" for i in range(100)] + [
    "Instruction: reverse the words\nInput: red green blue\nResponse: blue green red",
    "Instruction: sort the numbers\nInput: 3 1 2\nResponse: 1 2 3",
] * 20


@dataclass(frozen=True)
class Endpoint:
    url: str          # http://127.0.0.1:PORT
    api_key: str
    model: str
    checkpoint: Path

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"}

    def client(self, api_key: str | None = None):
        import openai
        return openai.OpenAI(base_url=self.base_url, api_key=api_key or self.api_key,
                             max_retries=0, timeout=60)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if requests.get(url + "/health", timeout=5).status_code == 200:
                return
        except (requests.ConnectionError, requests.Timeout):  # not up yet, or up but not ready
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url}/health never answered 200")


@pytest.fixture(scope="package")
def endpoint(tmp_path_factory) -> Endpoint:
    import ray
    from ray import serve

    from orchestration.serve.app import build_app
    from rlhf.config import ServeConfig
    from rlhf.tiny import make_tiny_base

    checkpoint = make_tiny_base(tmp_path_factory.mktemp("serve") / "tiny", TEXTS, vocab_size=300,
                                n_positions=CONTEXT, n_embd=32, n_layer=2, n_head=2)
    port = _free_port()
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(num_cpus=2, include_dashboard=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    cfg = ServeConfig(port=port, api_key=API_KEY, max_tokens_limit=MAX_TOKENS_LIMIT,
                      max_body_bytes=MAX_BODY_BYTES, max_batch_size=8, batch_wait_timeout_s=0.01)
    serve.run(build_app(checkpoint, cfg, model_name=MODEL), name="instructray-e2e",
              route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url)
        yield Endpoint(url, API_KEY, MODEL, checkpoint)
    finally:
        serve.shutdown()
        if started_ray:
            ray.shutdown()


@contextmanager
def side_app(endpoint: Endpoint, name: str, route: str, checkpoint, cfg, model_name: str, num_cpus: float = 1.0):
    """Another application (`name`, at endpoint.url + route) on the package's Serve instance; yields its
    URL once healthy and deletes it after."""
    from ray import serve

    from orchestration.serve.app import build_app

    serve.run(build_app(checkpoint, cfg, model_name=model_name, num_cpus=num_cpus),
              name=name, route_prefix=route, blocking=False)
    try:
        _wait_healthy(endpoint.url + route)
        yield endpoint.url + route
    finally:
        serve.delete(name)


@pytest.fixture(scope="package")
def reference(endpoint):
    """The served model and tokenizer loaded in the test process, for independent checks."""
    import torch

    from rlhf.models import load_policy, load_tokenizer
    torch.set_num_threads(1)
    return load_policy(endpoint.checkpoint).eval(), load_tokenizer(endpoint.checkpoint)


def _processes_naming(text: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text.encode() in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            pass  # gone meanwhile
    return pids


def _signal_processes_naming(text: str, sig: int) -> None:
    for pid in _processes_naming(text):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _stop_cluster(temp_dir: str) -> None:
    """SIGTERM, then SIGKILL, every process of the cluster whose files live in temp_dir."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        _signal_processes_naming(temp_dir, sig)
        deadline = time.time() + grace
        while _processes_naming(temp_dir) and time.time() < deadline:
            time.sleep(0.2)


def ray_start(temp_dir: str, *, address: str | None = None, port: int | None = None,
              dashboard_port: int | None = None, num_cpus: int = 2, resources: dict | None = None,
              block: bool = False) -> list[str]:
    """`ray start` of a head (`port`, and the dashboard at `dashboard_port`) or of a node joining
    `address`, on 127.0.0.1, its files under its own temp_dir (how it is found and stopped)."""
    cmd = [str(BIN / "ray"), "start", "--num-cpus", str(num_cpus), "--node-ip-address", "127.0.0.1",
           "--disable-usage-stats", "--temp-dir", temp_dir]
    if address is None:
        cmd += ["--head", "--port", str(port or _free_port()), "--ray-client-server-port", str(_free_port())]
        cmd += (["--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
                 "--include-dashboard", "true"] if dashboard_port else ["--include-dashboard", "false"])
    else:
        cmd += ["--address", address]
    # Every port a node binds, chosen free: another Ray instance on this machine (a user's
    # pipeline) holds the defaults, and a job agent that cannot bind 52365 never registers.
    for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port",
                 "--runtime-env-agent-port", "--node-manager-port", "--object-manager-port"):
        cmd += [flag, str(_free_port())]
    if resources:
        cmd += ["--resources", json.dumps(resources)]
    return cmd + (["--block"] if block else [])


def cluster_env() -> dict:
    """The environment of a client of a `ray start` cluster (Ray 2.60: token authentication)."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    return env


def submit_job(address: str, env: dict, entrypoint: list[str], *options: str, timeout_s: float = 900):
    """`ray job submit --address ADDRESS [options] -- entrypoint`, retried while the head has no job
    agent yet: right after `ray start` a submission is refused ("No available agent to submit job,
    please try again later") and nothing runs; on a loaded machine the agent has taken minutes."""
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, *options, "--", *entrypoint]
    deadline = time.time() + 420
    while True:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        if "No available agent" not in proc.stdout + proc.stderr or time.time() > deadline:
            return proc
        time.sleep(3)


@pytest.fixture(scope="package")
def cluster():
    """(dashboard address, env) of a real `ray start --head` cluster of its own, stopped at the end."""
    env = cluster_env()
    dash = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray-e2e-", dir="/tmp")  # short: Ray's socket paths live under it
    try:
        subprocess.run(ray_start(temp_dir, dashboard_port=dash), env=env, check=True, capture_output=True,
                       timeout=120)
        yield f"http://127.0.0.1:{dash}", env
    finally:
        _stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
