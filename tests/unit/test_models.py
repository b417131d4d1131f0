"""Policy loading and the scalar-head RM / critic: pooling by mask, HF compatibility."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification, PreTrainedModel

from rlhf.models import (
    ScalarModel,
    last_token_index,
    load_policy,
    load_tokenizer,
    position_ids_from_mask,
)
from rlhf.tiny import make_tiny_base

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "reverse: a b c d -> d c b a",
    "sort: 3 1 2 -> 1 2 3",
    "copy: hello world -> hello world",
] * 10


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    return make_tiny_base(out, SENTENCES, vocab_size=300, n_layer=2, n_head=2, n_embd=32, n_positions=64)


@pytest.fixture(scope="module")
def tokenizer(base_dir):
    return load_tokenizer(base_dir)


@pytest.fixture(scope="module")
def rm(base_dir):
    model = ScalarModel.from_causal_lm(base_dir, seed=1)
    model.reward_bias = 0.37
    return model.eval()


def _pad(seqs: list[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad by hand (not via the tokenizer) so the test controls every position."""
    width = max(map(len, seqs))
    ids, mask = [], []
    for s in seqs:
        fill = [pad_id] * (width - len(s))
        ids.append(fill + s if side == "left" else s + fill)
        zeros, ones = [0] * len(fill), [1] * len(s)
        mask.append(zeros + ones if side == "left" else ones + zeros)
    return torch.tensor(ids), torch.tensor(mask)


def _reference_values(model: ScalarModel, seq: list[int]) -> torch.Tensor:
    """Per-token values of ONE unpadded sequence, computed without our position/mask code."""
    ids = torch.tensor([seq])
    hidden = model.model.base_model(input_ids=ids).last_hidden_state[0]
    return hidden @ model.head.weight[0] + model.reward_bias


def test_position_ids_and_last_index_by_hand():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    assert position_ids_from_mask(mask).tolist() == [
        [0, 0, 0, 1, 2],
        [0, 1, 1, 1, 1],
        [0, 1, 2, 3, 4],
        [0, 0, 0, 0, 0],
    ]
    assert last_token_index(mask).tolist() == [4, 1, 4, 0]


def test_load_policy_and_dtype(base_dir):
    policy = load_policy(base_dir)
    assert isinstance(policy, PreTrainedModel) and policy.config.model_type == "gpt2"
    half = load_policy(base_dir, dtype=torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16
    assert torch.equal(half.transformer.wte.weight, policy.transformer.wte.weight.bfloat16())


def test_from_causal_lm_copies_backbone_and_adds_seeded_head(base_dir):
    policy = load_policy(base_dir)
    from_path = ScalarModel.from_causal_lm(base_dir, seed=5)
    from_obj = ScalarModel.from_causal_lm(policy, seed=5)
    policy_backbone = policy.base_model.state_dict()
    for model in (from_path, from_obj):
        backbone = model.model.base_model.state_dict()
        assert backbone.keys() == policy_backbone.keys()
        assert all(torch.equal(backbone[k], policy_backbone[k]) for k in backbone)
        assert not any("lm_head" in k for k in model.state_dict())
        assert model.head.weight.shape == (1, 32) and model.reward_bias == 0.0
    assert torch.equal(from_path.head.weight, from_obj.head.weight)
    other = ScalarModel.from_causal_lm(base_dir, seed=6)
    assert not torch.equal(other.head.weight, from_path.head.weight)
    # Default std 1/sqrt(d+1): for d=32 that is ~0.17, far from HF's 0.02 init.
    assert 0.08 < from_path.head.weight.std().item() < 0.3


def test_saved_rm_loads_in_hf_and_bias_closes_the_gap(rm, tokenizer, tmp_path):
    rm.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert json.loads((tmp_path / "config.json").read_text())["reward_bias"] == pytest.approx(0.37)
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=1).eval()
    ours = ScalarModel.from_pretrained(tmp_path).eval()
    assert ours.reward_bias == pytest.approx(0.37)
    # Right padding with a pad id distinct from eos: HF's pad search finds the same position.
    batch = tokenizer(["reverse: a b c", "sort: 3 1 2 -> 1 2 3", "fox"], padding=True, return_tensors="pt")
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    with torch.no_grad():
        raw = hf(**batch).logits.squeeze(-1)
        score = ours.score(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(raw + 0.37, score, atol=1e-6, rtol=0)


def test_from_pretrained_refuses_a_causal_lm(base_dir):
    with pytest.raises(ValueError, match="from_causal_lm"):
        ScalarModel.from_pretrained(base_dir)


def test_score_ignores_padding_side(rm, tokenizer):
    seqs = [tokenizer(t)["input_ids"] for t in ["reverse: a b c", "sort: 3 1 2 -> 1 2 3", "fox"]]
    with torch.no_grad():
        unpadded = torch.stack([rm.score(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0] for s in seqs])
        reference = torch.stack([_reference_values(rm, s)[-1] for s in seqs])
        left = rm.score(*_pad(seqs, tokenizer.pad_token_id, "left"))
        right = rm.score(*_pad(seqs, tokenizer.pad_token_id, "right"))
    torch.testing.assert_close(unpadded, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(left, unpadded, atol=1e-5, rtol=0)
    torch.testing.assert_close(right, unpadded, atol=1e-5, rtol=0)


def test_pad_equal_to_eos_breaks_hf_pooling_not_ours(rm, tokenizer):
    eos = tokenizer.eos_token_id
    rm.model.config.pad_token_id = eos  # the common pad==eos setup
    try:
        # Responses end with eos; one also contains eos mid-sequence.
        seqs = [
            tokenizer("reverse: a b")["input_ids"] + [eos],
            tokenizer("sort: 2 1")["input_ids"] + [eos] + tokenizer(" 1 2")["input_ids"] + [eos],
            tokenizer("fox jumps over")["input_ids"],
        ]
        with torch.no_grad():
            reference = torch.stack([_reference_values(rm, s)[-1] for s in seqs])
            ids, mask = _pad(seqs, eos, "right")
            ours_right = rm.score(ids, mask)
            ours_left = rm.score(*_pad(seqs, eos, "left"))
            hf_right = rm.model(input_ids=ids, attention_mask=mask).logits.squeeze(-1) + rm.reward_bias
    finally:
        rm.model.config.pad_token_id = tokenizer.pad_token_id
    torch.testing.assert_close(ours_right, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours_left, reference, atol=1e-5, rtol=0)
    # HF skips the trailing eos (it looks like padding) and reads the wrong token...
    assert (hf_right[:2] - reference[:2]).abs().min() > 1e-3
    # ...but agrees on the row without eos.
    torch.testing.assert_close(hf_right[2], reference[2], atol=1e-5, rtol=0)


def test_values_shape_masking_and_score_consistency(rm, tokenizer):
    seqs = [tokenizer(t)["input_ids"] for t in ["copy: hello world", "a b"]]
    for side in ("left", "right"):
        ids, mask = _pad(seqs, tokenizer.pad_token_id, side)
        with torch.no_grad():
            values = rm.values(ids, mask)
            score = rm.score(ids, mask)
        assert values.shape == ids.shape and values.dtype == torch.float32
        assert torch.all(values[mask == 0] == 0)
        for row, seq in enumerate(seqs):
            with torch.no_grad():
                expected = _reference_values(rm, seq)
            torch.testing.assert_close(values[row][mask[row] == 1], expected, atol=1e-5, rtol=0)
            assert score[row] == values[row, last_token_index(mask)[row]]


def test_left_padded_backward_is_finite(rm, tokenizer):
    seqs = [tokenizer(t)["input_ids"] for t in ["copy: hello world", "a"]]
    ids, mask = _pad(seqs, tokenizer.pad_token_id, "left")
    rm.train()
    try:
        rm.zero_grad()
        (rm.values(ids, mask).sum() + rm.score(ids, mask).sum()).backward()
    finally:
        rm.eval()
    grads = [p.grad for p in rm.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert rm.head.weight.grad.abs().sum() > 0
    rm.zero_grad()
