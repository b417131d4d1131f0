"""The hf engine's sampler: logprobs match a full recompute, masks are right, seeds repeat."""
import pytest
import torch

from rlhf.losses import logprobs_from_logits
from rlhf.models import position_ids_from_mask
from rlhf.sampling import left_pad, sample
from rlhf.tiny import build_tiny_model, train_tokenizer

TEXTS = ["the red fox runs over the hill", "a blue bird sings", "one two three four five"] * 20


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    tok = train_tokenizer(TEXTS, vocab_size=300)
    model = build_tiny_model(tok, n_layer=2, n_head=2, n_embd=32, n_positions=64).eval()
    return tok, model


def _prompts(tok):
    return [tok("the red fox")["input_ids"], tok("a")["input_ids"], tok("one two three four")["input_ids"]]


def test_sampler_logprobs_equal_a_full_forward(tiny):
    tok, model = tiny
    s = sample(model, _prompts(tok), max_new_tokens=12, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
               generator=torch.Generator().manual_seed(0))
    logits = model(input_ids=s.input_ids, attention_mask=s.attention_mask,
                   position_ids=position_ids_from_mask(s.attention_mask)).logits
    # the token at t is predicted by position t-1
    recomputed = torch.zeros_like(s.sampler_logprobs)
    recomputed[:, 1:] = logprobs_from_logits(logits[:, :-1], s.input_ids[:, 1:])
    m = s.action_mask.bool()
    assert m.any()
    torch.testing.assert_close(recomputed[m], s.sampler_logprobs[m], atol=1e-4, rtol=1e-4)
    assert (s.sampler_logprobs[~m] == 0).all()


def test_masks_cover_prompt_then_response_up_to_eos(tiny):
    tok, model = tiny
    prompts = _prompts(tok)
    s = sample(model, prompts, max_new_tokens=20, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
               generator=torch.Generator().manual_seed(1))
    for i, p in enumerate(prompts):
        row_attn = s.attention_mask[i]
        assert row_attn[: s.prompt_width].sum() == len(p)            # left padding
        assert s.input_ids[i, s.prompt_width - len(p): s.prompt_width].tolist() == p
        acts = s.action_mask[i, s.prompt_width:]
        n = int(acts.sum())
        assert acts[:n].all() and not acts[n:].any()                 # contiguous, right-padded
        resp = s.input_ids[i, s.prompt_width: s.prompt_width + n].tolist()
        assert tok.eos_token_id not in resp[:-1]                     # stops at the first EOS
        assert n == 20 or resp[-1] == tok.eos_token_id


def test_same_seed_same_samples_and_temperature_changes_them(tiny):
    tok, model = tiny
    run = lambda seed, t=1.0: sample(model, _prompts(tok), 10, tok.eos_token_id, tok.pad_token_id,
                                     temperature=t, generator=torch.Generator().manual_seed(seed))
    a, b = run(3), run(3)
    assert torch.equal(a.input_ids, b.input_ids)
    assert not torch.equal(run(3).input_ids, run(4).input_ids)


def test_top_p_tiny_keeps_only_the_argmax(tiny):
    tok, model = tiny
    prompts = _prompts(tok)
    s = sample(model, prompts, 6, tok.eos_token_id, tok.pad_token_id, top_p=1e-6,
               generator=torch.Generator().manual_seed(0))
    greedy = model.generate(*[t for t in left_pad(prompts, tok.pad_token_id)][:1],
                            attention_mask=left_pad(prompts, tok.pad_token_id)[1],
                            max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    w = s.prompt_width
    for i in range(len(prompts)):
        n = int(s.action_mask[i].sum())
        assert s.input_ids[i, w: w + n].tolist() == greedy[i, w: w + n].tolist()
        assert torch.allclose(s.sampler_logprobs[i, w: w + n], torch.zeros(n), atol=1e-5)
