"""Per-token forward passes: alignment with an explicit per-prefix loop, padding-invariant."""
import torch

from rlhf.forward import token_logprobs, token_values
from rlhf.models import ScalarModel
from rlhf.tiny import build_tiny_model, train_tokenizer


def _setup():
    tok = train_tokenizer(["red fox blue bird green cat"] * 30, vocab_size=300)
    model = build_tiny_model(tok, n_layer=1, n_head=2, n_embd=16, n_positions=32).eval()
    return tok, model


def test_logprobs_match_prefix_by_prefix_loop_and_ignore_left_padding():
    tok, model = _setup()
    ids = torch.tensor([tok("red fox blue bird")["input_ids"]])
    lp = token_logprobs(model, ids, torch.ones_like(ids))
    for t in range(1, ids.shape[1]):
        logits = model(input_ids=ids[:, :t]).logits[0, -1]
        assert torch.isclose(lp[0, t], logits.log_softmax(-1)[ids[0, t]], atol=1e-5)
    assert lp[0, 0] == 0
    padded = torch.cat([torch.full((1, 3), tok.pad_token_id), ids], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], 1)
    torch.testing.assert_close(token_logprobs(model, padded, mask)[:, 3:][:, 1:], lp[:, 1:], atol=1e-5, rtol=0)


def test_tempered_logprobs_and_entropy_match_the_prefix_loop_at_that_temperature():
    tok, model = _setup()
    ids = torch.tensor([tok("red fox blue bird")["input_ids"]])
    mask = torch.ones_like(ids)
    lp, ent = token_logprobs(model, ids, mask, with_entropy=True, temperature=0.7)
    for t in range(1, ids.shape[1]):
        logp = (model(input_ids=ids[:, :t]).logits[0, -1] / 0.7).log_softmax(-1)
        assert torch.isclose(lp[0, t], logp[ids[0, t]], atol=1e-5)
        assert torch.isclose(ent[0, t], -(logp.exp() * logp).sum(), atol=1e-5)
    assert lp[0, 0] == 0 and ent[0, 0] == 0
    # T = 1 is the plain model, computed exactly as without a temperature
    assert torch.equal(token_logprobs(model, ids, mask, temperature=1.0), token_logprobs(model, ids, mask))


def test_values_are_the_head_read_one_position_earlier():
    tok, model = _setup()
    critic = ScalarModel.from_causal_lm(model).eval()
    ids = torch.tensor([tok("green cat red fox")["input_ids"]])
    v = token_values(critic, ids, torch.ones_like(ids))
    for t in range(1, ids.shape[1]):
        assert torch.isclose(v[0, t], critic.score(ids[:, :t], torch.ones(1, t, dtype=torch.long))[0], atol=1e-5)
