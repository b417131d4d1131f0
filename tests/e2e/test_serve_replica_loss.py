"""A serving replica SIGKILLed under load: the endpoint keeps answering and Serve replaces it.

A third application on the package's Serve instance (route prefix /replicas, 2 decoder
replicas behind 2 HTTP fronts); 16 clients send completions without pause; one decoder
replica's process is killed mid-way. Serve itself does not retry a request a replica had
taken; the front sends those again to the survivor, so no client sees the loss, and Serve
starts a new replica. The counts are printed for the README's reliability table.
"""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import requests

from tests.e2e.conftest import _processes_naming

APP = "instructray-replicas"
DECODER = f"ServeReplica:{APP}:decoder"  # the process title of a decoder replica
CLIENTS = 16
MAX_ONGOING = 4  # per replica: the requests one death interrupts
BODY = {"model": "replicas", "prompt": "the quick brown", "max_tokens": 16, "seed": 1}


@pytest.fixture(scope="module")
def two_replicas(endpoint):
    from ray import serve

    from orchestration.serve.app import build_app
    from rlhf.config import ServeConfig

    cfg = ServeConfig(num_replicas=2, max_batch_size=4, max_ongoing_requests=MAX_ONGOING,
                      max_queued_requests=64, max_tokens_limit=48)
    serve.run(build_app(endpoint.checkpoint, cfg, model_name="replicas", num_cpus=0.5),
              name=APP, route_prefix="/replicas", blocking=False)
    url = endpoint.url + "/replicas"
    _wait_for(lambda: _running_replicas() == 2 and _ok(url), 180, "two running replicas")
    try:
        yield url
    finally:
        serve.delete(APP)


def _ok(url: str) -> bool:
    try:
        return requests.get(url + "/health", timeout=5).status_code == 200
    except requests.RequestException:
        return False


def _running_replicas() -> int:
    from ray import serve

    app = serve.status().applications.get(APP)
    if app is None:
        return 0
    decoder = app.deployments.get("decoder")
    return 0 if decoder is None else decoder.replica_states.get("RUNNING", 0)


def _wait_for(condition, timeout_s: float, what: str) -> float:
    start = time.time()
    while time.time() - start < timeout_s:
        if condition():
            return time.time() - start
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def _replica_pids() -> list[int]:
    return [p for p in _processes_naming(DECODER) if p != os.getpid()]


def test_a_replica_killed_under_load_is_replaced_and_the_endpoint_keeps_answering(two_replicas):
    pids = _replica_pids()
    assert len(pids) == 2, pids
    results: list[tuple[float, int]] = []  # (time, status; 0 = no HTTP answer)
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                code = requests.post(two_replicas + "/v1/completions", json=BODY, timeout=60).status_code
            except requests.RequestException:
                code = 0
            results.append((time.time(), code))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    time.sleep(3)
    killed_at = time.time()
    os.kill(pids[0], signal.SIGKILL)
    replaced_s = _wait_for(lambda: _running_replicas() == 2 and len(_replica_pids()) == 2
                           and pids[0] not in _replica_pids(), 120, "a new replica")
    time.sleep(3)  # load on the two replicas again
    stop.set()
    for t in threads:
        t.join(timeout=90)

    before = [c for t, c in results if t < killed_at]
    after = [c for t, c in results if t >= killed_at]
    failed = [c for c in after if c != 200]
    print(f"\nreplica loss: {len(results)} requests, {len(failed)} failed ({sorted(set(failed))}), "
          f"replaced in {replaced_s:.1f} s")
    assert before and all(c == 200 for c in before)
    assert after.count(200) > CLIENTS  # answered all along, by the survivor
    assert not failed, failed  # what the dead replica had taken was answered by the survivor
