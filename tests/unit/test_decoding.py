"""The decoding core's per-row settings: seeds independent of the batch, temperature / top-p / greedy
as a full forward pass computes them, rows ended by the caller, per-row token limits."""
import math

import pytest
import torch

import rlhf.decoding as decoding
from rlhf.models import position_ids_from_mask
from rlhf.tiny import build_tiny_model, train_tokenizer

TEXTS = ["the red fox runs over the hill", "a blue bird sings", "one two three four five"] * 20
WORDS = ["the red fox", "a", "one two three four", "a blue", "the hill", "five", "four five", "the"]


@pytest.fixture(scope="module")
def tiny():
    tok = train_tokenizer(TEXTS, vocab_size=300)
    model = build_tiny_model(tok, n_layer=2, n_head=2, n_embd=32, n_positions=64, seed=0).eval()
    with torch.no_grad():  # raise EOS so rows end at varied steps and the batch is compacted
        e = model.transformer.wte.weight[tok.eos_token_id]
        model.transformer.ln_f.bias.copy_(1.5 * e / e.norm() ** 2)
    return tok, model, [tok(w)["input_ids"] for w in WORDS] * 2


def _decode(model, tok, prompts, limit, finish_at=None, **kw) -> dict[int, list[tuple[int, float]]]:
    """{row: [(token, logprob), ...]} from the step-wise core; `finish_at` {row: step} ends rows early."""
    d = decoding.Decoding(model, prompts, limit, tok.eos_token_id, tok.pad_token_id, **kw)
    out: dict[int, list[tuple[int, float]]] = {i: [] for i in range(len(prompts))}
    for step in d:
        for r, t, lp in zip(step.rows.tolist(), step.tokens.tolist(), step.logprobs.tolist()):
            out[r].append((t, lp))
        d.finish([r for r, s in (finish_at or {}).items() if s == step.index])
    return out


def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_a_seeded_row_draws_the_same_tokens_whatever_shares_its_batch(tiny):
    tok, model, prompts = tiny
    n = len(prompts)
    temps = [1.0, 0.7, 1.5, 0.0] * (n // 4)
    top_ps = [1.0, 0.9, 1.0, 0.8, 0.95, 1.0, 0.6, 1.0] * (n // 8)
    limits = [20, 12, 20, 7] * (n // 4)
    seeds = [100 + 7 * i for i in range(n)]
    batched = _decode(model, tok, prompts, limits, temperature=temps, top_p=top_ps, generators=_gens(seeds))
    lengths = [len(batched[i]) for i in range(n)]
    assert len(set(lengths)) >= 4 and any(0 < x < lim for x, lim in zip(lengths, limits))  # EOS and limits
    for i in range(n):
        alone = _decode(model, tok, [prompts[i]], [limits[i]], temperature=[temps[i]], top_p=[top_ps[i]],
                        generators=_gens([seeds[i]]))[0]
        assert [t for t, _ in alone] == [t for t, _ in batched[i]], i
        torch.testing.assert_close(torch.tensor([lp for _, lp in alone]),
                                   torch.tensor([lp for _, lp in batched[i]]), atol=1e-4, rtol=0)
    # the seeds do matter: other seeds, other tokens
    other = _decode(model, tok, prompts, limits, temperature=temps, top_p=top_ps, generators=_gens(range(n)))
    assert any(other[i] != batched[i] for i in range(n) if temps[i] > 0)


def _nucleus(logits: torch.Tensor, temperature: float, top_p: float) -> dict[int, float]:
    """{token: probability} of the tempered, top-p truncated distribution, in float64 loops."""
    probs = torch.softmax(logits.double() / temperature, -1).tolist()
    kept, mass = {}, 0.0
    for token in sorted(range(len(probs)), key=lambda k: -probs[k]):
        if mass > top_p:
            break
        kept[token] = probs[token]
        mass += probs[token]
    return {k: p / mass for k, p in kept.items()}


def test_per_row_temperature_top_p_and_greedy_follow_a_full_forward(tiny):
    tok, model, prompts = tiny
    n = len(prompts)
    temps = [1.0, 0.5, 2.0, 0.0, 1.3, 0.8, 0.0, 1.0] * (n // 8)
    top_ps = [1.0, 1.0, 0.7, 1.0, 0.5, 0.9, 0.3, 0.2] * (n // 8)
    got = _decode(model, tok, prompts, 10, temperature=temps, top_p=top_ps, generators=_gens(range(n)))
    checked = 0
    for i in range(n):
        ids = torch.tensor([prompts[i] + [t for t, _ in got[i]]])
        # one pass over the whole sequence, no cache, no padding
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                       position_ids=position_ids_from_mask(torch.ones_like(ids))).logits[0].float()
        for k, (token, logp) in enumerate(got[i]):
            row_logits = logits[len(prompts[i]) + k - 1]
            if temps[i] == 0:
                assert token == int(row_logits.argmax()) and logp == 0.0
                continue
            nucleus = _nucleus(row_logits, temps[i], top_ps[i])
            assert token in nucleus, (i, k)
            assert abs(logp - math.log(nucleus[token])) < 1e-4, (i, k)
            checked += 1
    assert checked > 50


def test_draw_follows_each_rows_temperature_and_top_p():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -30.0]).repeat(20_000, 1)
    temperature = torch.tensor([0.5, 2.0])[:, None].repeat(10_000, 1)
    top_p = torch.tensor([1.0, 0.6])[:, None].repeat(10_000, 1)
    token, logp = decoding._draw(logits, temperature, top_p, torch.Generator().manual_seed(0))
    for row, t, p in ((0, 0.5, 1.0), (1, 2.0, 0.6)):
        want = torch.zeros(5, dtype=torch.float64)
        for k, q in _nucleus(logits[0], t, p).items():
            want[k] = q
        freq = torch.bincount(token[row::2], minlength=5).double() / 10_000
        assert (freq - want).abs().max() < 0.02, (row, freq, want)  # ~4 standard errors at n=10k
        torch.testing.assert_close(logp[row::2].double(), want[token[row::2]].log(), atol=1e-5, rtol=0)


def test_finished_rows_stop_and_the_others_are_unchanged(tiny):
    tok, model, prompts = tiny
    n = len(prompts)
    seeds = list(range(50, 50 + n))
    full = _decode(model, tok, prompts, 16, generators=_gens(seeds))
    stop = {i: 1 for i in range(0, n, 3) if len(full[i]) > 2}  # ended by the caller after two tokens
    assert stop
    cut = _decode(model, tok, prompts, 16, finish_at=stop, generators=_gens(seeds))
    for i in range(n):
        want = full[i][:2] if i in stop else full[i]
        assert [t for t, _ in cut[i]] == [t for t, _ in want], i
        # a smaller batch rounds the forward pass differently: logprobs agree to float error
        assert all(abs(a - b) < 1e-4 for (_, a), (_, b) in zip(cut[i], want)), i


def test_per_row_limits_and_shared_generator_repeat(tiny):
    tok, model, prompts = tiny
    limits = [0, 1, 3, 16] * (len(prompts) // 4)
    a = _decode(model, tok, prompts, limits, generator=torch.Generator().manual_seed(3))
    b = _decode(model, tok, prompts, limits, generator=torch.Generator().manual_seed(3))
    assert a == b
    for i, limit in enumerate(limits):
        assert len(a[i]) <= limit
        assert len(a[i]) == limit or a[i][-1][0] == tok.eos_token_id


def test_raw_logprobs_for_the_rows_that_ask_follow_a_full_forward_and_change_no_draw(tiny):
    tok, model, prompts = tiny
    n = len(prompts)
    temps = [1.0, 0.5, 0.0, 1.3] * (n // 4)
    top_ps = [1.0, 0.7, 1.0, 0.4] * (n // 4)
    asks = [3, None, 0, 5, None, 1, 2, None] * (n // 8)
    kw = dict(temperature=temps, top_p=top_ps)
    d = decoding.Decoding(model, prompts, 12, tok.eos_token_id, tok.pad_token_id, top_logprobs=asks,
                          generators=_gens(range(n)), **kw)
    plain = _decode(model, tok, prompts, 12, generators=_gens(range(n)), **kw)
    got: dict[int, list] = {i: [] for i in range(n)}
    for step in d:
        by_row = dict(zip(step.rows.tolist(), zip(step.tokens.tolist(), step.logprobs.tolist())))
        assert set(step.raw_rows.tolist()) == {r for r in by_row if asks[r] is not None}
        assert step.raw.top_ids.shape == (len(step.raw_rows), 5)
        for j, r in enumerate(step.raw_rows.tolist()):
            got[r].append((by_row[r][0], step.raw.select(j)))
        for r, pair in by_row.items():
            assert pair == plain[r][step.index]  # asking changes no token and no sampler logprob
    checked = 0
    for i in range(n):
        assert len(got[i]) == (0 if asks[i] is None else len(plain[i]))
        if not got[i]:
            continue
        ids = torch.tensor([prompts[i] + [t for t, _ in plain[i]]])
        with torch.no_grad():  # one pass over the whole sequence, no cache, no padding
            full = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        for k, (token, raw) in enumerate(got[i]):
            want = full[len(prompts[i]) + k - 1]
            assert abs(float(raw.chosen) - float(want[token])) < 1e-4, (i, k)
            top = want.topk(5)
            torch.testing.assert_close(raw.top_logprobs, top.values, atol=1e-4, rtol=0)
            assert raw.top_logprobs.tolist() == sorted(raw.top_logprobs.tolist(), reverse=True)
            checked += 1
    assert checked > 30


def test_no_row_asking_means_no_raw_logprobs(tiny):
    tok, model, prompts = tiny
    d = decoding.Decoding(model, prompts[:3], 4, tok.eos_token_id, tok.pad_token_id,
                          top_logprobs=[None] * 3, generator=torch.Generator().manual_seed(0))
    assert d.raw_asks is None
    assert all(step.raw is None and step.raw_rows is None for step in d)
