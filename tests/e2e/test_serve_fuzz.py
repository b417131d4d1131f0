"""Robustness of the live endpoint: fuzzed request bodies and a small concurrent load.

Fuzz: hypothesis builds request bodies that are mostly plausible (so they get
past parsing into the engine) with any field replaced, now and then, by
arbitrary JSON, plus raw byte bodies. Whatever it sends, the answer is never a
5xx: a 4xx with an OpenAI-style error body, or a well-formed 200.
"""
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from .conftest import CONTEXT, MODEL

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))

scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
anything = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)


# Half the bodies are valid requests (edge values included) so they reach the
# engine; the other half are valid ones with one or two fields set to arbitrary JSON.
SAMPLING = {
    "max_tokens": st.integers(1, 16),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0, 1),
    "n": st.integers(1, 3),
    "stop": st.text(min_size=1, max_size=4) | st.lists(st.text(min_size=1, max_size=4), max_size=4),
    "seed": st.integers(-(2**63), 2**64 - 1),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "user": st.text(max_size=10),
}
valid_completion = st.fixed_dictionaries(
    {"model": st.just(MODEL),
     "prompt": st.text(max_size=30) | st.lists(st.text(max_size=20), min_size=1, max_size=3)
     | st.lists(st.integers(0, 299), min_size=1, max_size=30)
     | st.lists(st.lists(st.integers(0, 299), max_size=5), min_size=1, max_size=3)},
    optional=SAMPLING)
content = st.text(max_size=30) | st.lists(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=15)}), max_size=2)
message = st.fixed_dictionaries({"role": st.sampled_from(["system", "developer", "user", "assistant"]),
                                 "content": content})
valid_chat = st.fixed_dictionaries(
    {"model": st.just(MODEL), "messages": st.lists(message, min_size=1, max_size=3)},
    optional={**SAMPLING, "max_completion_tokens": st.integers(1, 16)})
FIELDS = ["model", "prompt", "messages", "max_completion_tokens", "logprobs", "echo", *SAMPLING]


def mutated(valid):
    changes = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), anything,
                              min_size=1, max_size=2)
    return st.tuples(valid, changes).map(lambda t: {**t[0], **t[1]})


completion_bodies = valid_completion | mutated(valid_completion)
chat_bodies = valid_chat | mutated(valid_chat)
extra_keys = st.dictionaries(st.text(min_size=1, max_size=10), anything, max_size=2)


def check_response(r: requests.Response, stream_object: str, object_: str) -> None:
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        err = r.json()["error"]
        assert isinstance(err["message"], str) and isinstance(err["type"], str)
        assert "param" in err and "code" in err
        return
    assert r.status_code == 200
    if r.headers["content-type"].startswith("text/event-stream"):
        events = [line[6:] for line in r.text.split("\n\n") if line]
        assert events[-1] == "[DONE]"
        for data in events[:-1]:
            chunk = json.loads(data)
            assert "error" not in chunk and chunk["object"] == stream_object
        return
    body = r.json()
    assert body["object"] == object_ and body["choices"]
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    for c in body["choices"]:
        assert c["finish_reason"] in ("stop", "length")
        assert isinstance(c["text"] if "text" in c else c["message"]["content"], str)


def post(endpoint, path: str, body) -> requests.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return requests.post(endpoint.url + path, data=data, timeout=60,
                         headers={**endpoint.headers, "Content-Type": "application/json"})


@FUZZ
@given(body=completion_bodies, extra=extra_keys)
def test_fuzz_completions_never_5xx(endpoint, body, extra):
    r = post(endpoint, "/v1/completions", {**extra, **body})  # unknown keys are ignored
    event(f"HTTP {r.status_code}")  # --hypothesis-show-statistics shows the mix
    check_response(r, "text_completion", "text_completion")


@FUZZ
@given(body=chat_bodies, extra=extra_keys)
def test_fuzz_chat_never_5xx(endpoint, body, extra):
    r = post(endpoint, "/v1/chat/completions", {**extra, **body})
    event(f"HTTP {r.status_code}")  # --hypothesis-show-statistics shows the mix
    check_response(r, "chat.completion.chunk", "chat.completion")


def _prompt_lengths(tok, body: dict) -> list[int]:
    if "messages" in body:
        msgs = [{"role": "system" if m["role"] == "developer" else m["role"],
                 "content": m["content"] if isinstance(m["content"], str)
                 else "".join(p["text"] for p in m["content"])} for m in body["messages"]]
        prompts = [tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)]
    else:
        p = body["prompt"]
        prompts = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else p
    # Text is tokenized; an empty prompt is sent as one BOS token.
    return [max(1, len(tok.encode(p) if isinstance(p, str) else p)) for p in prompts]


def check_valid(r: requests.Response, body: dict, tok) -> None:
    """A valid body is a 200 with one choice per prompt x n, unless it does not fit the context."""
    budget = body.get("max_completion_tokens") or body.get("max_tokens") \
        or (16 if "prompt" in body else None)
    lengths = _prompt_lengths(tok, body)
    if any(n >= CONTEXT or (budget and n + budget > CONTEXT) for n in lengths):
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        return
    assert r.status_code == 200, r.text
    if body.get("stream"):
        return
    out = r.json()
    assert len(out["choices"]) == len(lengths) * body.get("n", 1)
    assert out["usage"]["prompt_tokens"] == sum(lengths)
    if budget:
        assert out["usage"]["completion_tokens"] <= budget * len(out["choices"])


@FUZZ
@given(body=valid_completion)
def test_fuzz_valid_completions_succeed(endpoint, reference, body):
    r = post(endpoint, "/v1/completions", body)
    event(f"HTTP {r.status_code}")  # --hypothesis-show-statistics shows the mix
    check_response(r, "text_completion", "text_completion")
    check_valid(r, body, reference[1])


@FUZZ
@given(body=valid_chat)
def test_fuzz_valid_chats_succeed(endpoint, reference, body):
    r = post(endpoint, "/v1/chat/completions", body)
    event(f"HTTP {r.status_code}")  # --hypothesis-show-statistics shows the mix
    check_response(r, "chat.completion.chunk", "chat.completion")
    check_valid(r, body, reference[1])


@FUZZ
@given(raw=st.binary(max_size=300) | anything.map(lambda v: json.dumps(v).encode()),
       path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
def test_fuzz_raw_bodies_are_4xx(endpoint, raw, path):
    r = post(endpoint, path, raw)
    event(f"HTTP {r.status_code}")
    assert 400 <= r.status_code < 500, r.text
    assert isinstance(r.json()["error"]["message"], str)


def test_still_serving_after_fuzz(endpoint):
    assert requests.get(endpoint.url + "/health", timeout=10).status_code == 200
    r = post(endpoint, "/v1/completions", {"model": MODEL, "prompt": "the", "max_tokens": 3})
    assert r.status_code == 200 and len(r.json()["choices"]) == 1


def test_load_smoke_concurrent_clients(endpoint):
    """4 clients x 5 requests, completions and chat interleaved, all well-formed; seeded
    texts equal the ones the same requests give when sent alone (batching is invisible)."""
    def completion(seed: int) -> str:
        r = post(endpoint, "/v1/completions",
                 {"model": MODEL, "prompt": "the quick", "max_tokens": 8, "seed": seed})
        check_response(r, "text_completion", "text_completion")
        return r.json()["choices"][0]["text"]

    def chat(seed: int) -> str:
        r = post(endpoint, "/v1/chat/completions",
                 {"model": MODEL, "messages": [{"role": "user", "content": "the quick"}],
                  "max_tokens": 8, "seed": seed})
        check_response(r, "chat.completion.chunk", "chat.completion")
        return r.json()["choices"][0]["message"]["content"]

    alone = [completion(seed) for seed in range(3)]
    with ThreadPoolExecutor(4) as pool:
        texts = list(pool.map(lambda k: (chat if k % 2 else completion)(k % 3), range(20)))
    # The tiny chat template renders the user message verbatim: same prompt ids, same text.
    assert texts == [alone[k % 3] for k in range(20)]
