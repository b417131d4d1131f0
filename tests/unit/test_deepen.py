"""Depth up-scaling keeps the model's function, adds trainable depth, and saves as a deeper model."""
import pytest
import torch
from transformers import (AutoModelForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM)

from rlhf.deepen import add_layers
from rlhf.models import ScalarModel


def gpt2(n_layer=2):
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=97, n_layer=n_layer, n_head=2, n_embd=32, n_positions=32))


def llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32))


@pytest.mark.parametrize("make", [gpt2, llama], ids=["gpt2", "llama"])
def test_added_blocks_leave_the_outputs_unchanged_and_learn(make):
    model = make().eval()
    ids = torch.randint(0, 97, (3, 11))
    before = model(ids).logits
    params = sum(p.numel() for p in model.parameters())
    assert add_layers(model, 3) == 5
    assert model.config.num_hidden_layers == 5
    per_block = sum(p.numel() for p in model.base_model.layers[0].parameters()) if hasattr(
        model.base_model, "layers") else sum(p.numel() for p in model.base_model.h[0].parameters())
    assert sum(p.numel() for p in model.parameters()) == params + 3 * per_block
    assert torch.equal(model(ids).logits, before)  # zeroed writers add exactly 0 to the residual
    model.train()
    model(ids, labels=ids).loss.backward()
    new = list(model.base_model.layers if hasattr(model.base_model, "layers") else model.base_model.h)[2:]
    for block in new:  # the zeroed projections get gradient, so the new depth trains
        writers = [m for name, m in block.named_modules() if name.endswith(("c_proj", "o_proj", "down_proj"))]
        assert writers and all(float(m.weight.grad.abs().sum()) > 0 for m in writers)


def test_a_deepened_reward_model_saves_and_loads_as_the_deeper_model(tmp_path):
    base = gpt2()
    base.save_pretrained(tmp_path / "base")
    rm = ScalarModel.from_causal_lm(tmp_path / "base", seed=0)
    ids, mask = torch.randint(0, 97, (2, 9)), torch.ones(2, 9, dtype=torch.long)
    before = rm.score(ids, mask)
    add_layers(rm.model, 2)
    assert torch.equal(rm.eval().score(ids, mask), before)
    rm.save_pretrained(tmp_path / "rm")
    again = ScalarModel.from_pretrained(tmp_path / "rm")
    assert again.config.n_layer == 4 and len(again.model.transformer.h) == 4
    assert torch.equal(again.eval().score(ids, mask), before)


def test_zero_extra_layers_is_a_no_op_and_unknown_blocks_are_refused():
    model = gpt2()
    assert add_layers(model, 0) == 2 and len(model.transformer.h) == 2
    seq = AutoModelForSequenceClassification.from_config(GPT2Config(vocab_size=97, n_layer=1, n_head=2, n_embd=32,
                                                                    num_labels=1))
    for block in seq.transformer.h:  # rename the writers so nothing can be zeroed
        block.attn.add_module("out_w", block.attn.c_proj)
        del block.attn.c_proj
    with pytest.raises(ValueError, match="residual projections"):
        add_layers(seq, 1)
