"""The model's own logprobs: a batch of left-padded prompts scores each prompt as a pass over it alone."""
import pytest
import torch

from rlhf.logprobs import RawLogprobs, prompt_logprobs
from rlhf.tiny import build_tiny_model, train_tokenizer

TEXTS = ["the red fox runs over the hill", "a blue bird sings", "one two three four five"] * 20


@pytest.fixture(scope="module")
def tiny():
    tok = train_tokenizer(TEXTS, vocab_size=300)
    return tok, build_tiny_model(tok, n_layer=2, n_head=2, n_embd=32, n_positions=64, seed=0).eval()


def test_of_is_log_softmax_with_sorted_top_k():
    logits = torch.tensor([[3.0, 1.0, 2.0, -1.0], [0.0, 0.0, 5.0, 1.0]])
    raw = RawLogprobs.of(logits, torch.tensor([3, 2]), 2)
    want = torch.log_softmax(logits, -1)
    torch.testing.assert_close(raw.chosen, want[[0, 1], [3, 2]])
    assert raw.top_ids.tolist() == [[0, 2], [2, 3]]
    torch.testing.assert_close(raw.top_logprobs, want.gather(1, raw.top_ids))
    assert RawLogprobs.of(logits, torch.tensor([0, 0]), 0).top_ids.shape == (2, 0)
    assert RawLogprobs.of(logits, torch.tensor([0, 0]), 9).top_ids.shape == (2, 4)  # k capped at V
    assert len(raw.select(slice(1, 2))) == 1


def test_prompt_logprobs_equal_each_prompt_alone(tiny):
    tok, model = tiny
    prompts = [tok(t)["input_ids"] for t in ["the red fox runs", "a", "one two three four five", "a blue"]]
    got = prompt_logprobs(model, prompts, 3, tok.pad_token_id)
    for p, raw in zip(prompts, got):
        assert len(raw) == len(p) - 1
        with torch.no_grad():
            full = torch.log_softmax(model(input_ids=torch.tensor([p])).logits[0].float(), -1)
        torch.testing.assert_close(raw.chosen, full[torch.arange(len(p) - 1), p[1:]], atol=1e-4, rtol=0)
        torch.testing.assert_close(raw.top_logprobs, full[:-1].topk(3).values, atol=1e-4, rtol=0)
    # in passes of at most 8 positions (one prompt alone when it is longer): the same scores
    for a, b in zip(prompt_logprobs(model, prompts, 3, tok.pad_token_id, max_positions=8), got):
        torch.testing.assert_close(a.chosen, b.chosen, atol=1e-5, rtol=0)
        assert torch.equal(a.top_ids, b.top_ids)
