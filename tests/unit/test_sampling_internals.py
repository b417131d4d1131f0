"""The sampler's fast paths: inverse-CDF draws are exact; dropping finished rows changes nothing."""
import pytest
import torch

import rlhf.decoding as decoding
import rlhf.sampling as sampling
from rlhf.losses import logprobs_from_logits
from rlhf.models import position_ids_from_mask
from rlhf.tiny import build_tiny_model, train_tokenizer

TEXTS = ["the red fox runs over the hill", "a blue bird sings", "one two three four five"] * 20


def _eos_model(tok, boost: float):
    """A tiny model whose EOS logit is raised by `boost`, so rows end at varied steps."""
    model = build_tiny_model(tok, n_layer=2, n_head=2, n_embd=32, n_positions=64, seed=0).eval()
    with torch.no_grad():
        e = model.transformer.wte.weight[tok.eos_token_id]
        model.transformer.ln_f.bias.copy_(boost * e / e.norm() ** 2)
    return model


@pytest.fixture(scope="module")
def eos_heavy():
    tok = train_tokenizer(TEXTS, vocab_size=300)
    model = _eos_model(tok, 2.0)  # sampled rows end about one step in ten
    prompts = [tok(t)["input_ids"] for t in ["the red fox", "a", "one two three four", "a blue", "the hill",
                                            "five", "four five", "the"]] * 3
    return tok, model, prompts


def _run(model, tok, prompts, **kw):
    return sampling.sample(model, prompts, 24, tok.eos_token_id, tok.pad_token_id, **kw)


def test_rows_end_at_different_steps(eos_heavy):
    tok, model, prompts = eos_heavy
    s = _run(model, tok, prompts, generator=torch.Generator().manual_seed(0))
    lengths = s.action_mask.sum(1)
    # enough early endings that the batch is compacted at least once, and some long rows
    assert (lengths < lengths.max()).float().mean() >= 0.25 and lengths.max() > 2 * lengths.min()


def test_compacted_logprobs_equal_a_full_forward(eos_heavy):
    tok, model, prompts = eos_heavy
    s = _run(model, tok, prompts, generator=torch.Generator().manual_seed(1))
    logits = model(input_ids=s.input_ids, attention_mask=s.attention_mask,
                   position_ids=position_ids_from_mask(s.attention_mask)).logits
    recomputed = torch.zeros_like(s.sampler_logprobs)
    recomputed[:, 1:] = logprobs_from_logits(logits[:, :-1], s.input_ids[:, 1:])
    m = s.action_mask.bool()
    torch.testing.assert_close(recomputed[m], s.sampler_logprobs[m], atol=1e-4, rtol=1e-4)
    for i in range(len(prompts)):
        acts = s.action_mask[i, s.prompt_width:]
        n = int(acts.sum())
        assert acts[:n].all() and not acts[n:].any()
        resp = s.input_ids[i, s.prompt_width: s.prompt_width + n].tolist()
        assert tok.eos_token_id not in resp[:-1] and (n == 24 or resp[-1] == tok.eos_token_id)
        assert (s.input_ids[i, s.prompt_width + n:] == tok.pad_token_id).all()


def test_greedy_result_is_the_same_with_and_without_compaction(eos_heavy, monkeypatch):
    tok, _, prompts = eos_heavy
    model = _eos_model(tok, 0.3)  # greedy rows of this one end anywhere from step 1 to never
    compacted = _run(model, tok, prompts, top_p=1e-6)
    monkeypatch.setattr(decoding, "COMPACT_AT", 0.0)  # never drop a row
    full = _run(model, tok, prompts, top_p=1e-6)
    assert len(set(full.action_mask.sum(1).tolist())) >= 4
    assert torch.equal(compacted.input_ids, full.input_ids)
    assert torch.equal(compacted.action_mask, full.action_mask)
    torch.testing.assert_close(compacted.sampler_logprobs, full.sampler_logprobs, atol=1e-5, rtol=0)


def test_draw_matches_the_categorical_and_never_picks_filtered_tokens():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0], [0.0, 0.0, 0.0, 0.0, 0.0]]).repeat(20_000, 1)
    token, logp = decoding._draw(logits, temperature=1.0, top_p=1.0, generator=torch.Generator().manual_seed(0))
    for row in (0, 1):
        freq = torch.bincount(token[row::2], minlength=5).float() / 20_000
        want = torch.softmax(logits[row], -1)
        assert (freq - want).abs().max() < 0.01, (freq, want)  # ~4 standard errors at n=20k
    torch.testing.assert_close(logp, torch.log_softmax(logits, -1).gather(1, token[:, None]).squeeze(1))
    # temperature and top-p: the draw follows the tempered, truncated distribution
    token, logp = decoding._draw(logits[:4000], temperature=0.5, top_p=0.9,
                                 generator=torch.Generator().manual_seed(1))
    tempered = torch.log_softmax(logits[0] / 0.5, -1)  # p = .865, .117, .016, ...: top-0.9 keeps 2
    kept = torch.tensor([True, True, False, False, False])
    expect = torch.log_softmax(tempered.masked_fill(~kept, float("-inf")), -1)
    first = token[0::2]
    assert set(first.tolist()) == {0, 1}
    assert abs((first == 1).float().mean() - expect[1].exp()) < 0.025
    torch.testing.assert_close(logp[0::2], expect[first])
