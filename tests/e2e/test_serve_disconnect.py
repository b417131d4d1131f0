"""Streams whose clients disconnect free their batch slot: the replica serves at full speed after.

Serve runs a `@serve.batch` batch to its end even for callers that left, and the next batch
waits for it; without the engine dropping their rows, a wave of abandoned long streams would
hold every request behind it for one full-length decode. A third application on the package's
Serve instance serves a model that never emits EOS, so every stream would run to its limit.
"""
from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.e2e.conftest import TEXTS, side_app

pytestmark = pytest.mark.slow
LONG = 900      # tokens a dropped stream asked for (the model's context is 1024)
STREAMS = 16    # four batches' worth
CAPACITY = {"max_batch_size": 4, "max_ongoing_requests": 8, "max_queued_requests": 16}


@pytest.fixture(scope="module")
def endless(endpoint, tmp_path_factory):
    from rlhf.config import ServeConfig
    from rlhf.tiny import build_tiny_model, never_emit, train_tokenizer

    folder = tmp_path_factory.mktemp("endless")
    tok = train_tokenizer(TEXTS, vocab_size=300, model_max_length=1024)
    model = build_tiny_model(tok, n_layer=4, n_head=4, n_embd=128, n_positions=1024)
    never_emit(model, tok.eos_token_id)
    tok.save_pretrained(folder)
    model.save_pretrained(folder)
    cfg = ServeConfig(max_tokens_limit=LONG, **CAPACITY)
    with side_app(endpoint, "instructray-endless", "/endless", folder, cfg, "endless", num_cpus=0.5) as url:
        yield url


def _complete(url: str, max_tokens: int) -> tuple[float, dict]:
    start = time.perf_counter()
    r = requests.post(url + "/v1/completions", timeout=300,
                      json={"model": "endless", "prompt": "the quick brown", "max_tokens": max_tokens})
    assert r.status_code == 200, r.text
    return time.perf_counter() - start, r.json()


def _drop_stream(url: str, seed: int) -> bytes:
    """Open a long stream, read its first event, hang up."""
    body = {"model": "endless", "prompt": "the quick brown", "max_tokens": LONG, "stream": True, "seed": seed}
    with requests.post(url + "/v1/completions", json=body, stream=True, timeout=60) as r:
        assert r.status_code == 200, r.text
        first = next(line for line in r.iter_lines() if line)
    return first


def test_disconnected_streams_free_their_slots_and_service_is_at_full_speed(endless):
    full_s, body = _complete(endless, LONG)
    assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == LONG
    alone = statistics.median(_complete(endless, 8)[0] for _ in range(3))

    with ThreadPoolExecutor(STREAMS) as pool:
        firsts = list(pool.map(lambda s: _drop_stream(endless, s), range(STREAMS)))
    assert all(f.startswith(b"data: {") for f in firsts)
    with ThreadPoolExecutor(4) as pool:
        after = list(pool.map(lambda _: _complete(endless, 8)[0], range(4)))
    print(f"\ndisconnect: a {LONG}-token answer {full_s:.2f} s, an 8-token one alone {alone:.2f} s; "
          f"after {STREAMS} dropped streams, 4 at once took {max(after):.2f} s at most")
    # Rows left running would hold these behind at least one full-length decode.
    assert max(after) < alone + 0.25 * full_s, (after, alone, full_s)
