"""The decoding attention: one-query steps equal sdpa's answer; everything else is sdpa itself."""
import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from rlhf import decode_attention
from rlhf.decoding import Decoding
from rlhf.tiny import build_tiny_model, train_tokenizer


class _Module(torch.nn.Module):
    """What transformers passes as `module`: eval mode, `num_key_value_groups` and `is_causal`."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups, self.is_causal = groups, True


def _qkv(q_len: int, heads: int = 4, kv_heads: int = 2, length: int = 9, d: int = 8, capacity: int = 12):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, q_len, heads, d, generator=g).transpose(1, 2)  # as the models lay it out
    # Keys and values as a view into a longer cache buffer, as rlhf.decoding's cache hands them over.
    k = torch.randn(3, kv_heads, capacity, d, generator=g)[:, :, :length]
    v = torch.randn(3, kv_heads, capacity, d, generator=g)[:, :, :length]
    return q, k, v


def _reference(q, k, v, mask, scale):
    """torch's fused kernel on keys repeated per query head."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).transpose(1, 2)


@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_one_query_steps_equal_the_fused_kernel(mask_kind, kv_heads):
    q, k, v = _qkv(1, kv_heads=kv_heads)
    attended = torch.ones(3, 1, 1, k.shape[2], dtype=torch.bool)
    attended[0, ..., :4] = False  # a left-padded row
    attended[2, ..., 6] = False   # a row that ended: its later slot is not attended
    mask = {"none": None, "bool": attended,
            "additive": torch.zeros(attended.shape).masked_fill(~attended, float("-inf"))}[mask_kind]
    out, weights = decode_attention.one_query_attention(_Module(4 // kv_heads), q, k, v, mask, scaling=0.3)
    assert weights is None and out.shape == (3, 1, 4, 8)
    torch.testing.assert_close(out, _reference(q, k, v, mask if mask is not None else None, 0.3),
                               atol=1e-6, rtol=1e-5)


def test_every_other_call_is_transformers_sdpa_exactly():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q, k, v = _qkv(5, kv_heads=4, length=5, capacity=5)
    ours, _ = decode_attention.one_query_attention(_Module(1), q, k, v, None, scaling=0.3)
    theirs, _ = sdpa_attention_forward(_Module(1), q, k, v, None, scaling=0.3)
    assert torch.equal(ours, theirs)


def _decode(model, prompts, eos, pad):
    steps = list(Decoding(model, prompts, 10, eos, pad, generators=[torch.Generator().manual_seed(i)
                                                                   for i in range(len(prompts))]))
    return torch.cat([s.tokens for s in steps]), torch.cat([s.logprobs for s in steps])


def test_gpt2_decodes_the_same_tokens_as_with_eager_attention():
    tok = train_tokenizer(["the red fox runs over the hill", "a blue bird sings"] * 20, vocab_size=300)
    torch.manual_seed(0)
    model = build_tiny_model(tok, n_layer=2, n_head=2, n_embd=32, n_positions=64).eval()
    eager = build_tiny_model(tok, n_layer=2, n_head=2, n_embd=32, n_positions=64).eval()
    eager.load_state_dict(model.state_dict())
    eager.set_attn_implementation("eager")
    prompts = [tok("the red fox")["input_ids"], tok("a")["input_ids"], tok("a blue bird sings")["input_ids"]]
    tokens, logprobs = _decode(model, prompts, tok.eos_token_id, tok.pad_token_id)
    assert model.config._attn_implementation == decode_attention.NAME
    assert eager.config._attn_implementation == "eager"  # only sdpa models are switched
    ref_tokens, ref_logprobs = _decode(eager, prompts, tok.eos_token_id, tok.pad_token_id)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logprobs, ref_logprobs, atol=1e-5, rtol=1e-5)


def test_grouped_query_llama_decodes_as_with_eager_attention_and_others_keep_sdpa():
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    eager = LlamaForCausalLM(copy.deepcopy(config)).eval()  # its own config: the switch mutates it
    eager.load_state_dict(model.state_dict())
    eager.set_attn_implementation("eager")
    prompts = [[5, 6, 7, 8], [9], [10, 11]]
    tokens, logprobs = _decode(model, prompts, eos=1, pad=0)
    assert model.config._attn_implementation == decode_attention.NAME
    ref_tokens, ref_logprobs = _decode(eager, prompts, eos=1, pad=0)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logprobs, ref_logprobs, atol=1e-5, rtol=1e-5)

    opt = OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=1,
                                   num_attention_heads=4, max_position_embeddings=64,
                                   word_embed_proj_dim=32, attn_implementation="sdpa")).eval()
    assert decode_attention.use_for_decoding(opt) is False
    assert opt.config._attn_implementation == "sdpa"
