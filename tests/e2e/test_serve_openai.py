"""The official `openai` client (and raw HTTP) against the real running endpoint.

The served model is a randomly initialised tiny GPT-2, so texts are gibberish;
the checks are about the API's contract: greedy output equals transformers'
own greedy `generate`, seeds reproduce, streaming concatenates to the same text,
stop strings cut where they first occur, usage counts tokens, errors are 4xx,
logprobs (and echoed prompts' logprobs) are the model's own log-softmax.
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
    "unsupported best_of": (json.dumps({"model": "tiny-e2e", "prompt": "a", "best_of": 3}).encode(), 400),
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


# ---- logprobs ---------------------------------------------------------------------------

def _log_softmax(model, ids):
    """One pass over the whole sequence, no cache, no padding: [len(ids), V]."""
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)


def _greedy(model, tok, ids, n):
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return out[0, len(ids):].tolist()


def _text(tok, token):
    return tok.decode([token], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def test_completion_logprobs_are_the_models_log_softmax(endpoint, reference):
    model, tok = reference
    ids = tok.encode(PROMPT)
    r = complete(endpoint, prompt=PROMPT, max_tokens=10, temperature=0, logprobs=3)
    lp, n = r.choices[0].logprobs, r.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    new = _greedy(model, tok, ids, 10)
    assert lp.tokens == [_text(tok, t) for t in new]
    full = _log_softmax(model, ids + new)
    for k, token in enumerate(new):
        want = full[len(ids) + k - 1]
        # raw, not the sampler's: a greedy token's logprob under its point mass would be 0
        assert abs(lp.token_logprobs[k] - float(want[token])) < 1e-4
        top = lp.top_logprobs[k]
        assert list(top.values()) == sorted(top.values(), reverse=True)
        assert lp.tokens[k] in top  # greedy: the chosen token is the most likely one
        # keys are texts: tokens that decode alike (half characters) share one entry
        best = want.topk(3).values.tolist()
        assert 1 <= len(top) <= 3 and abs(max(top.values()) - best[0]) < 1e-4
        assert all(min(abs(v - b) for b in best) < 1e-4 for v in top.values())
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    assert all(o <= len(r.choices[0].text) for o in lp.text_offset)


def test_sampled_completion_logprobs_hold_the_chosen_token(endpoint):
    r = complete(endpoint, prompt=PROMPT, max_tokens=12, seed=5, temperature=1.5, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == r.usage.completion_tokens
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0 and token in top and len(top) <= 3  # 3: the chosen token was not top-2
        assert list(top.values()) == sorted(top.values(), reverse=True)


def test_echo_with_max_tokens_zero_scores_the_prompt(endpoint, reference):
    model, tok = reference
    ids = tok.encode(TASK)
    r = complete(endpoint, prompt=ids, max_tokens=0, echo=True, logprobs=1, n=2)
    full = _log_softmax(model, ids)
    for choice in r.choices:
        lp = choice.logprobs
        assert choice.text == TASK and choice.finish_reason == "length"
        assert lp.tokens == [_text(tok, t) for t in ids]
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        got = torch.tensor(lp.token_logprobs[1:])
        torch.testing.assert_close(got, full[torch.arange(len(ids) - 1), ids[1:]], atol=1e-4, rtol=0)
        for k, top in enumerate(lp.top_logprobs[1:]):
            assert abs(max(top.values()) - float(full[k].max())) < 1e-4
            # lm-evaluation-harness's is_greedy: the token's logprob is the top one exactly
            assert (lp.token_logprobs[k + 1] == max(top.values())) == (ids[k + 1] == int(full[k].argmax()))
        assert [TASK[o:o + len(t)] for o, t in zip(lp.text_offset, lp.tokens)] == lp.tokens
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(ids)
    # lm-evaluation-harness's request (echo, max_tokens 1, logprobs 1): it sums the
    # continuation's positions after the context, less the generated token
    ctx = tok.encode("Instruction: reverse the words")
    assert ids[:len(ctx)] == ctx
    lm = complete(endpoint, prompt=ids, max_tokens=1, echo=True, logprobs=1, temperature=0).choices[0]
    assert lm.text.startswith(TASK) and len(lm.logprobs.tokens) == len(ids) + 1
    assert sum(lm.logprobs.token_logprobs[len(ctx):-1]) == pytest.approx(
        float(full[torch.arange(len(ctx) - 1, len(ids) - 1), ids[len(ctx):]].sum()), abs=1e-3)


def test_echo_text_prompt_then_completion(endpoint):
    plain = complete(endpoint, prompt=PROMPT, max_tokens=6, seed=3, logprobs=0)
    echoed = complete(endpoint, prompt=PROMPT, max_tokens=6, seed=3, logprobs=0, echo=True)
    text, lp = echoed.choices[0].text, echoed.choices[0].logprobs
    assert text == PROMPT + plain.choices[0].text
    k = len(lp.tokens) - len(plain.choices[0].logprobs.tokens)
    assert lp.tokens[k:] == plain.choices[0].logprobs.tokens
    assert lp.text_offset[k:] == [o + len(PROMPT) for o in plain.choices[0].logprobs.text_offset]
    assert all(len(t) == 1 for t in lp.top_logprobs[k:])  # logprobs 0: the chosen token only
    assert complete(endpoint, prompt=PROMPT, max_tokens=2, echo=True).choices[0].logprobs is None


def test_chat_logprobs_with_top_logprobs(endpoint, reference):
    model, tok = reference
    r = chat(endpoint, TASK, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    ids = tok.encode(TASK)  # the tiny chat template renders a user message verbatim
    new = _greedy(model, tok, ids, 8)
    assert len(content) == r.usage.completion_tokens == len(new)
    full = _log_softmax(model, ids + new)
    for k, (item, token) in enumerate(zip(content, new)):
        want = full[len(ids) + k - 1]
        assert item.token == _text(tok, token) and item.bytes == list(item.token.encode("utf-8"))
        assert abs(item.logprob - float(want[token])) < 1e-4
        assert len(item.top_logprobs) == 2 and item.top_logprobs[0].token == item.token
        torch.testing.assert_close(torch.tensor([t.logprob for t in item.top_logprobs]),
                                   want.topk(2).values, atol=1e-4, rtol=0)
    assert chat(endpoint, TASK, max_tokens=3, logprobs=True).choices[0].logprobs.content[0].top_logprobs == []
    assert chat(endpoint, TASK, max_tokens=3).choices[0].logprobs is None


def test_streamed_logprobs_concatenate_to_the_whole(endpoint):
    kw = dict(prompt=PROMPT, max_tokens=12, seed=21, logprobs=2, echo=True)
    whole = complete(endpoint, **kw).choices[0]
    chunks = [c.choices[0] for c in complete(endpoint, stream=True, **kw) if c.choices]
    assert len(chunks) > 2 and chunks[0].text == PROMPT  # the echo comes first, then token by token
    parts = [c.logprobs for c in chunks]
    assert "".join(c.text for c in chunks) == whole.text
    for field in ("tokens", "text_offset"):
        assert sum((getattr(p, field) for p in parts), []) == getattr(whole.logprobs, field)
    streamed = sum((p.token_logprobs for p in parts), [])
    assert streamed[0] is None and whole.logprobs.token_logprobs[0] is None
    assert streamed[1:] == pytest.approx(whole.logprobs.token_logprobs[1:], abs=1e-4)
    assert [t and list(t) for p in parts for t in p.top_logprobs] == \
        [t and list(t) for t in whole.logprobs.top_logprobs]

    whole_chat = chat(endpoint, TASK, max_tokens=10, seed=8, logprobs=True, top_logprobs=1).choices[0]
    items = [i for c in chat(endpoint, TASK, max_tokens=10, seed=8, logprobs=True, top_logprobs=1,
                             stream=True) if c.choices and c.choices[0].logprobs
             for i in c.choices[0].logprobs.content]
    assert [i.token for i in items] == [i.token for i in whole_chat.logprobs.content]
    assert [i.logprob for i in items] == pytest.approx([i.logprob for i in whole_chat.logprobs.content],
                                                       abs=1e-4)


LOGPROB_BAD = {  # name -> (route, extra body fields, the param the 400 names)
    "logprobs over 5": ("completions", {"logprobs": 6}, "logprobs"),
    "logprobs negative": ("completions", {"logprobs": -1}, "logprobs"),
    "logprobs as bool": ("completions", {"logprobs": True}, "logprobs"),
    "echo as int": ("completions", {"echo": 1}, "echo"),
    "max_tokens 0 without echo": ("completions", {"max_tokens": 0}, "max_tokens"),
    "max_tokens negative with echo": ("completions", {"max_tokens": -1, "echo": True}, "max_tokens"),
    "top_logprobs on completions": ("completions", {"top_logprobs": 2}, "top_logprobs"),
    "top_logprobs over 5": ("chat/completions", {"logprobs": True, "top_logprobs": 6}, "top_logprobs"),
    "top_logprobs without logprobs": ("chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    "top_logprobs with logprobs false": ("chat/completions", {"logprobs": False, "top_logprobs": 0},
                                         "top_logprobs"),
    "chat logprobs as int": ("chat/completions", {"logprobs": 1}, "logprobs"),
    "echo on chat": ("chat/completions", {"echo": True}, "echo"),
    "chat max_tokens 0": ("chat/completions", {"max_tokens": 0, "logprobs": True}, "max_tokens"),
}


@pytest.mark.parametrize("name", list(LOGPROB_BAD))
def test_bad_logprob_requests_are_400_naming_the_field(endpoint, name):
    route, extra, param = LOGPROB_BAD[name]
    base = {"model": endpoint.model, "max_tokens": 2}
    base.update({"prompt": "a"} if route == "completions" else {"messages": [{"role": "user", "content": "a"}]})
    r = requests.post(f"{endpoint.url}/v1/{route}", headers=endpoint.headers, timeout=30, json={**base, **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text
    assert complete(endpoint, prompt="a", max_tokens=1, logprobs=1).choices[0].logprobs.tokens


def test_request_logs_never_hold_a_key(endpoint):
    import time
    from pathlib import Path

    import ray

    wrong = "sk-typed-wrong-4821"
    assert endpoint.client().completions.create(model=endpoint.model, prompt="a", max_tokens=2).choices
    with pytest.raises(openai.AuthenticationError):
        endpoint.client(api_key=wrong).completions.create(model=endpoint.model, prompt="a", max_tokens=2)
    time.sleep(2)  # Serve's access lines reach their files
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    texts = [p.read_text(errors="replace") for p in logs.rglob("*")
             if p.is_file() and p.suffix in {".log", ".out", ".err"}]
    assert any("/v1/completions" in t for t in texts)  # the requests were logged, just not their keys
    assert not [t for t in texts if endpoint.api_key in t or wrong in t]
