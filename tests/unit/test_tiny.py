"""The no-hub tiny tokenizer/model factory: round trips, determinism, residual dropout."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from rlhf.tiny import (
    CHAT_TEMPLATE,
    EOS_TOKEN,
    PAD_TOKEN,
    build_tiny_model,
    make_tiny_base,
    set_residual_dropout,
    train_tokenizer,
)

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "reverse: a b c d -> d c b a",
    "sort: 3 1 2 -> 1 2 3",
    "copy: hello world -> hello world",
    "count the letters in banana",
    "add: 12 + 30 = 42",
] * 10
SMALL = dict(n_layer=2, n_head=2, n_embd=32, n_positions=64)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(SENTENCES, vocab_size=300, model_max_length=64)


def test_tokenizer_special_tokens_and_size(tokenizer):
    assert tokenizer.eos_token == EOS_TOKEN and tokenizer.bos_token == EOS_TOKEN
    assert tokenizer.pad_token == PAD_TOKEN
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.padding_side == "right"
    assert tokenizer.model_max_length == 64
    # 256 byte symbols + 2 specials, plus merges learnt from the corpus, capped by vocab_size.
    assert 258 < len(tokenizer) <= 300
    # A learnt merge: a frequent word costs fewer tokens than its bytes.
    assert len(tokenizer("reverse")["input_ids"]) < len("reverse")


def test_tokenizer_round_trips_through_disk(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    texts = ["reverse: x y z", "héllo ✓ unseen bytes\n\ttabs", " leading space"]
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert loaded(text)["input_ids"] == ids
        # Byte-level: every string decodes back exactly, no unknowns.
        assert loaded.decode(ids) == text
    assert loaded.pad_token_id == tokenizer.pad_token_id
    assert loaded.eos_token_id == tokenizer.eos_token_id
    assert loaded.pad_token_id != loaded.eos_token_id
    assert loaded.padding_side == "right"
    batch = loaded(["a", "reverse: a b"], padding=True)
    assert batch["input_ids"][0][-1] == loaded.pad_token_id
    assert batch["attention_mask"][0][-1] == 0


def test_chat_template_renders_prompt_verbatim_and_survives_reload(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.chat_template == CHAT_TEMPLATE
    prompt = "Instruction: Reverse the words.\nInput: a b c\nResponse:"
    user = [{"role": "user", "content": prompt}]
    assert loaded.apply_chat_template(user, tokenize=False, add_generation_prompt=True) == prompt
    # Served ids are exactly the ids the model was trained on.
    served = loaded.apply_chat_template(user, add_generation_prompt=True, return_dict=True)
    assert served["input_ids"] == loaded(prompt)["input_ids"]
    convo = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": " c b a"},
    ]
    assert loaded.apply_chat_template(convo, tokenize=False) == (
        "Be brief.\n\n" + prompt + " c b a<|endoftext|>"
    )


def test_build_is_deterministic_and_leaves_global_rng_alone(tokenizer):
    state = torch.get_rng_state()
    a = build_tiny_model(tokenizer, seed=3, **SMALL)
    assert torch.equal(state, torch.get_rng_state())
    b = build_tiny_model(tokenizer, seed=3, **SMALL)
    c = build_tiny_model(tokenizer, seed=4, **SMALL)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.transformer.wte.weight, c.transformer.wte.weight)
    assert a.config.vocab_size == len(tokenizer)
    for cfg in (a.config, a.generation_config):
        assert cfg.eos_token_id == tokenizer.eos_token_id
        assert cfg.pad_token_id == tokenizer.pad_token_id
        assert cfg.bos_token_id == tokenizer.bos_token_id


def test_make_tiny_base_round_trips_with_identical_logits(tmp_path):
    out = make_tiny_base(tmp_path / "base", SENTENCES, vocab_size=300, seed=7, **SMALL)
    assert (out / "model.safetensors").exists()
    assert not (out / "pytorch_model.bin").exists()
    tok = AutoTokenizer.from_pretrained(out)
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    fresh = build_tiny_model(tok, seed=7, **SMALL).eval()
    assert loaded.config.n_positions == tok.model_max_length == 64
    assert loaded.generation_config.pad_token_id == tok.pad_token_id
    ids = tok(["reverse: a b c", "sort: 3 1"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = fresh(**ids).logits
        got = loaded(**ids).logits
    assert got.shape == (2, ids["input_ids"].shape[1], len(tok))
    assert torch.equal(got, expected)


def test_set_residual_dropout_wires_config_and_modules(tokenizer):
    model = build_tiny_model(tokenizer, seed=0, **SMALL)
    ids = torch.tensor([tokenizer("the quick brown fox jumps")["input_ids"]])
    model.eval()
    with torch.no_grad():
        reference = model(ids).logits
    model.train()
    with torch.no_grad():  # p=0 in train mode: still deterministic
        assert torch.equal(model(ids).logits, model(ids).logits)

    set_residual_dropout(model, 0.2)
    assert model.config.resid_pdrop == 0.2
    for block in model.transformer.h:
        assert block.attn.resid_dropout.p == 0.2 and block.mlp.dropout.p == 0.2
        assert block.attn.attn_dropout.p == 0.0  # attention dropout is not residual
    assert model.transformer.drop.p == 0.0  # nor is embedding dropout

    torch.manual_seed(0)
    with torch.no_grad():
        first, second = model(ids).logits, model(ids).logits
    assert not torch.allclose(first, second)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference)


def test_set_residual_dropout_persists_through_save(tokenizer, tmp_path):
    model = build_tiny_model(tokenizer, seed=0, **SMALL)
    set_residual_dropout(model, 0.2)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.resid_pdrop == 0.2
    assert all(b.attn.resid_dropout.p == 0.2 and b.mlp.dropout.p == 0.2 for b in loaded.transformer.h)


def test_set_residual_dropout_rejects_unsupported(tokenizer):
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64, hidden_size=16, intermediate_size=32,
            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        )
    )
    with pytest.raises(NotImplementedError, match="GPT-2"):
        set_residual_dropout(llama, 0.2)
    with pytest.raises(NotImplementedError):
        set_residual_dropout(torch.nn.Linear(2, 2), 0.2)
    with pytest.raises(ValueError):
        set_residual_dropout(build_tiny_model(tokenizer, **SMALL), 1.5)
