"""Overload is shed, not queued without bound: 10x more concurrent clients than a replica admits.

A second application on the package's Serve instance (route prefix /overload) admits
2 requests at a time and queues 2 more (serve.max_ongoing_requests, max_queued_requests);
40 clients at once must get either a normal answer or, quickly, 503 with Retry-After; the
admitted ones keep their latency, the replica's memory stays put, and it serves normally after.
"""
from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor

from pathlib import Path

import pytest
import requests

from tests.e2e.conftest import _processes_naming, side_app

CAPACITY = {"max_batch_size": 2, "max_ongoing_requests": 2, "max_queued_requests": 2, "retry_after_s": 2}
CLIENTS = 40  # 10x what the replica and the proxy's queue take
BODY = {"model": "overload", "prompt": "the quick brown", "max_tokens": 32, "seed": 1}


@pytest.fixture(scope="module")
def overloaded(endpoint):
    from rlhf.config import ServeConfig

    cfg = ServeConfig(max_tokens_limit=48, **CAPACITY)
    with side_app(endpoint, "instructray-overload", "/overload", endpoint.checkpoint, cfg, "overload",
                  num_cpus=0.5) as url:
        yield url


def _post(url: str) -> tuple[int, float, dict]:
    start = time.perf_counter()
    r = requests.post(url + "/v1/completions", json=BODY, timeout=120)
    return r.status_code, time.perf_counter() - start, {k.lower(): v for k, v in r.headers.items()} | {"body": r.text}


def _replica_rss() -> int:
    """Resident bytes of the overload app's replica process(es), from /proc."""
    total = 0
    for pid in _processes_naming("instructray-overload"):
        for line in (Path("/proc") / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total


def test_the_excess_gets_503_with_retry_after_and_the_admitted_keep_their_latency(overloaded):
    alone = [_post(overloaded)[1] for _ in range(4)]
    rss_before = _replica_rss()
    waves = []
    for _ in range(2):  # twice: memory after the second wave equals that after the first
        with ThreadPoolExecutor(CLIENTS) as pool:
            waves.append(list(pool.map(lambda _: _post(overloaded), range(CLIENTS))))
    rss_after = _replica_rss()
    for results in waves:
        codes = [code for code, _, _ in results]
        assert set(codes) <= {200, 503}, codes
        admitted = [t for code, t, _ in results if code == 200]
        shed = [(t, h) for code, t, h in results if code == 503]
        print(f"\noverload: {len(admitted)} admitted (median {statistics.median(admitted):.2f} s, alone "
              f"{statistics.median(alone):.2f} s), {len(shed)} shed (slowest {max(t for t, _ in shed):.2f} s); "
              f"replica RSS {rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MiB")
        assert len(admitted) >= 4 and len(shed) >= CLIENTS // 2, (len(admitted), len(shed))
        assert all(h.get("retry-after") == "2" for _, h in shed)
        assert all(h["body"].strip() for _, h in shed)  # Serve's proxy says why, in plain text
        # shed at once, not after waiting its turn; the admitted wait at most a batch or two
        assert max(t for t, _ in shed) < 2.0
        assert statistics.median(admitted) < 4 * statistics.median(alone) + 0.5
    assert rss_before > 0 and rss_after - rss_before < 50 * 2 ** 20


def test_serving_normally_after_the_overload(overloaded):
    assert requests.get(overloaded + "/health", timeout=10).status_code == 200
    codes = [_post(overloaded)[0] for _ in range(3)]
    assert codes == [200, 200, 200]
