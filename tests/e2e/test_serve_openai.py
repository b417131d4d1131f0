"""The official `openai` client (and raw HTTP) against the real running endpoint.

The served model is a randomly initialised tiny GPT-2, so texts are gibberish;
the checks are about the API's contract: greedy output equals transformers'
own greedy `generate`, seeds reproduce, streaming concatenates to the same text,
stop strings cut where they first occur, usage counts tokens, errors are 4xx.
"""
import json

import openai
import pytest
import requests
import torch

from .conftest import CONTEXT, MAX_BODY_BYTES, MAX_TOKENS_LIMIT

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]
PROMPT = "the quick brown"
TASK = "Instruction: reverse the words\nInput: red green blue\nResponse:"


def complete(ep, **kw):
    return ep.client().completions.create(model=ep.model, **kw)


def chat(ep, content, **kw):
    return ep.client().chat.completions.create(
        model=ep.model, messages=[{"role": "user", "content": content}], **kw)


def test_models_and_health(endpoint):
    assert [m.id for m in endpoint.client().models.list()] == [endpoint.model]
    assert requests.get(endpoint.url + "/health", timeout=10).status_code == 200  # open route


def test_auth_rejected_without_the_key(endpoint):
    with pytest.raises(openai.AuthenticationError):
        endpoint.client(api_key="sk-wrong").completions.create(model=endpoint.model, prompt="a")
    for path, method in [("/v1/completions", "post"), ("/v1/chat/completions", "post"),
                         ("/v1/models", "get")]:
        r = requests.request(method, endpoint.url + path, json={"model": endpoint.model}, timeout=10)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"


def test_greedy_equals_transformers_generate(endpoint, reference):
    model, tok = reference
    ids = tok.encode(PROMPT)
    ref = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    expected = tok.decode(ref[0, len(ids):], skip_special_tokens=True, clean_up_tokenization_spaces=False)
    greedy = complete(endpoint, prompt=PROMPT, max_tokens=12, temperature=0)
    assert greedy.choices[0].text == expected
    # top_p -> 0 keeps only the most likely token: greedy again, at temperature 1.
    assert complete(endpoint, prompt=PROMPT, max_tokens=12, top_p=1e-9, seed=5).choices[0].text == expected
    assert greedy.usage.prompt_tokens == len(ids)
    assert greedy.usage.completion_tokens == ref.shape[1] - len(ids)


def test_completion_max_tokens_and_usage(endpoint, reference):
    _, tok = reference
    r = complete(endpoint, prompt=PROMPT, max_tokens=7, seed=3)
    choice = r.choices[0]
    assert r.object == "text_completion" and r.model == endpoint.model
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(tok.encode(PROMPT))
    assert 1 <= r.usage.completion_tokens <= 7
    if choice.finish_reason == "length":
        assert r.usage.completion_tokens == 7
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_seed_reproducible_and_matters(endpoint):
    a = complete(endpoint, prompt=PROMPT, max_tokens=16, seed=1234).choices[0].text
    b = complete(endpoint, prompt=PROMPT, max_tokens=16, seed=1234).choices[0].text
    c = complete(endpoint, prompt=PROMPT, max_tokens=16, seed=4321).choices[0].text
    assert a == b
    assert a != c  # 16 near-uniform draws over 300 tokens: a collision is vanishingly rare


def test_n_choices_are_the_seeded_singles(endpoint):
    r = complete(endpoint, prompt=PROMPT, max_tokens=10, n=3, seed=77)
    singles = [complete(endpoint, prompt=PROMPT, max_tokens=10, seed=77 + k) for k in range(3)]
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.text for c in r.choices] == [s.choices[0].text for s in singles]
    assert r.usage.prompt_tokens == singles[0].usage.prompt_tokens  # counted once
    assert r.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)


def test_prompt_formats(endpoint, reference):
    _, tok = reference
    text = complete(endpoint, prompt=PROMPT, max_tokens=8, seed=9).choices[0].text
    assert complete(endpoint, prompt=tok.encode(PROMPT), max_tokens=8, seed=9).choices[0].text == text
    both = complete(endpoint, prompt=[PROMPT, "lazy dog"], max_tokens=8, seed=9)
    assert [c.index for c in both.choices] == [0, 1] and both.choices[0].text == text


def _stop_for(text: str) -> str | None:
    """A 2-character stop string from the later part of `text` (no replacement chars)."""
    for k in range(len(text) // 3, len(text) - 1):
        cand = text[k:k + 2]
        if "\ufffd" not in cand and cand.strip():
            return cand
    return None


def test_stop_strings_cut_at_first_occurrence(endpoint):
    for seed in range(20):
        full = complete(endpoint, prompt=PROMPT, max_tokens=24, seed=seed).choices[0].text
        stop = _stop_for(full)
        if stop:
            break
    assert stop, "no usable stop string in 20 samples"
    r = complete(endpoint, prompt=PROMPT, max_tokens=24, seed=seed, stop=["@@never@@", stop])
    assert r.choices[0].text == full[:full.find(stop)]
    assert r.choices[0].finish_reason == "stop"
    c = chat(endpoint, PROMPT, max_tokens=24, seed=seed, stop=stop)
    assert c.choices[0].message.content == full[:full.find(stop)]  # tiny template: prompt verbatim


def test_streaming_completion(endpoint):
    whole = complete(endpoint, prompt=PROMPT, max_tokens=12, seed=21)
    chunks = list(complete(endpoint, prompt=PROMPT, max_tokens=12, seed=21, stream=True,
                           stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == whole.choices[0].text
    assert len(texts) > 1  # token by token, not one final blob
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_chat_and_streaming_chat(endpoint, reference):
    _, tok = reference
    r = chat(endpoint, TASK, max_tokens=10, seed=8)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert isinstance(r.choices[0].message.content, str)
    # The tiny chat template renders a user message verbatim.
    assert r.usage.prompt_tokens == len(tok.encode(TASK))
    assert r.choices[0].message.content == complete(endpoint, prompt=TASK, max_tokens=10, seed=8).choices[0].text
    chunks = list(chat(endpoint, TASK, max_tokens=10, seed=8, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_chat_n_and_system_message(endpoint):
    r = endpoint.client().chat.completions.create(
        model=endpoint.model, n=2, max_tokens=5, seed=1,
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
    assert [c.index for c in r.choices] == [0, 1]


def test_prompt_too_long_via_client(endpoint):
    with pytest.raises(openai.BadRequestError) as e:
        complete(endpoint, prompt="dog " * (2 * CONTEXT), max_tokens=4)
    assert e.value.body["code"] == "context_length_exceeded"


BAD = {  # name -> (body bytes, expected status)
    "malformed json": (b'{"model": "tiny-e2e", "prompt": ', 400),
    "not an object": (b"[1, 2, 3]", 400),
    "lone surrogate": (b'{"model": "tiny-e2e", "prompt": "x\\ud800"}', 400),
    "unknown model": (json.dumps({"model": "gpt-9", "prompt": "a"}).encode(), 404),
    "missing prompt": (json.dumps({"model": "tiny-e2e"}).encode(), 400),
    "max_tokens over limit": (json.dumps({"model": "tiny-e2e", "prompt": "a",
                                          "max_tokens": MAX_TOKENS_LIMIT + 1}).encode(), 400),
    "prompt plus max_tokens over context": (json.dumps({"model": "tiny-e2e", "prompt": "dog " * 60,
                                                        "max_tokens": 40}).encode(), 400),
    "max_tokens as string": (json.dumps({"model": "tiny-e2e", "prompt": "a", "max_tokens": "5"}).encode(), 400),
    "n as bool": (json.dumps({"model": "tiny-e2e", "prompt": "a", "n": True}).encode(), 400),
    "temperature too high": (json.dumps({"model": "tiny-e2e", "prompt": "a", "temperature": 9}).encode(), 400),
    "token id outside vocab": (json.dumps({"model": "tiny-e2e", "prompt": [5, 99999]}).encode(), 400),
    "empty stop": (json.dumps({"model": "tiny-e2e", "prompt": "a", "stop": [""]}).encode(), 400),
    "unsupported logprobs": (json.dumps({"model": "tiny-e2e", "prompt": "a", "logprobs": 3}).encode(), 400),
    "body too large": (json.dumps({"model": "tiny-e2e", "prompt": "a" * MAX_BODY_BYTES}).encode(), 413),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_request_is_4xx_then_server_still_serves(endpoint, name):
    body, status = BAD[name]
    r = requests.post(endpoint.url + "/v1/completions", data=body, timeout=30,
                      headers={**endpoint.headers, "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
    assert "param" in err and "code" in err
    assert complete(endpoint, prompt="a", max_tokens=2).choices[0].text is not None


@pytest.mark.parametrize("messages", ["hi", [], [{"role": "wizard", "content": "x"}],
                                      [{"role": "user", "content": 5}], [{"content": "x"}]])
def test_bad_chat_messages_are_400(endpoint, messages):
    r = requests.post(endpoint.url + "/v1/chat/completions", headers=endpoint.headers, timeout=30,
                      json={"model": endpoint.model, "messages": messages})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages")


def test_unknown_route_and_method(endpoint):
    r = requests.post(endpoint.url + "/v1/engines", headers=endpoint.headers, timeout=10)
    assert r.status_code == 404 and "error" in r.json()
    r = requests.get(endpoint.url + "/v1/completions", headers=endpoint.headers, timeout=10)
    assert r.status_code == 405 and "error" in r.json()
