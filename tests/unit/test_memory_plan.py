"""The memory plan's arithmetic, checked another way, and its refusals.

Parameter counts against torch's count of real (tiny) HF models of each architecture
the presets use; the per-layer activation count against the tensors autograd saves
for an HF GPT-2 block; the CPU peak-memory helper against tensors of known size; the
paper presets' plans and the refusal of layouts that do not fit.
"""
from __future__ import annotations

import inspect

import pytest
import torch
import transformers
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, GPT2Config, GPTJConfig,
                          GPTNeoConfig, OPTConfig)

from rlhf import memory_math as mm
from rlhf.config import Config, ConfigError, _set_dotted, load_config, parse_override, require_trainable, resolve_preset
from rlhf.memory_measure import live_tensor_bytes, measure_peak
from rlhf.memory_plan import CAUSAL_LM_FORWARD_KEEPS_KV, VLLM_GPU_MEMORY_UTILIZATION, memory_plan, model_shape

transformers.logging.set_verbosity_error()

TINY_ARCHS = {
    "gpt2": GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=97, n_positions=40),
    "gpt_neo": GPTNeoConfig(num_layers=2, hidden_size=32, num_heads=4, vocab_size=97, max_position_embeddings=40,
                            attention_types=[[["global", "local"], 1]]),
    "gptj": GPTJConfig(n_layer=2, n_embd=32, n_head=4, vocab_size=97, n_positions=40, rotary_dim=4),
    "opt": OPTConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, ffn_dim=64, vocab_size=97,
                     max_position_embeddings=40, word_embed_proj_dim=32),
}


def _preset(name: str, *overrides: str) -> Config:
    """A preset validated field by field only (other cross-field refusals are not the subject here)."""
    import yaml

    raw = yaml.safe_load(resolve_preset(name).read_text())
    for text in overrides:
        _set_dotted(raw, *parse_override(text))
    return Config.model_validate(raw)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_parameter_counts_match_torchs_count_of_real_models(arch):
    config = TINY_ARCHS[arch]
    shape = mm.shape_from_hf_config(arch, config.to_dict())
    lm = AutoModelForCausalLM.from_config(config)
    assert shape.params("lm") == sum(p.numel() for p in lm.parameters())  # tied heads counted once
    config.num_labels = 1
    scalar = AutoModelForSequenceClassification.from_config(config)
    assert shape.params("scalar") == sum(p.numel() for p in scalar.parameters())


def test_known_shapes_give_the_published_sizes():
    sizes = {name: s.params("lm") for name, s in mm.KNOWN_SHAPES.items()}
    assert sizes["EleutherAI/gpt-neo-1.3B"] == 1_315_575_808  # the HF model card's count
    assert 6.0e9 < sizes["EleutherAI/gpt-j-6b"] < 6.1e9
    assert 174e9 < sizes["facebook/opt-175b"] < 176e9


def test_a_preset_names_models_the_plan_knows():
    for preset in ("instructgpt-1.3b", "instructgpt-6b", "instructgpt-175b"):
        cfg = _preset(preset)
        assert model_shape(cfg, "policy") is not None and model_shape(cfg, "reward") is not None
    assert model_shape(load_config("tiny"), "policy").params() == 544_256  # 0.54M, configs/small.yaml says


def test_the_plan_counts_the_blocks_the_rm_stage_adds():
    cfg = load_config("tiny", ["rm.added_layers=3", "model.tiny.n_layer=2"])
    assert model_shape(cfg, "policy").layers == 2 and model_shape(cfg, "reward").layers == 5
    assert model_shape(load_config("tiny", ["rm.added_layers=0", "model.tiny.n_layer=2"]), "reward").layers == 2


@pytest.mark.parametrize("activation", ["gelu_new", "relu"])
def test_layer_activations_are_what_autograd_saves_for_a_gpt2_block(activation):
    """Saved tensors of one block (unique storages, parameters excluded), on rows x seq."""
    rows, seq, h, heads = 4, 16, 32, 4
    config = GPT2Config(n_layer=1, n_embd=h, n_head=heads, vocab_size=50, n_positions=seq,
                        activation_function=activation)
    block = AutoModelForCausalLM.from_config(config).eval().transformer.h[0]
    weights = {p.untyped_storage().data_ptr() for p in block.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in weights:
            saved[st.data_ptr()] = st.nbytes()
        return t
    x = torch.randn(rows, seq, h, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x)
    shape = mm.ModelShape("b", 1, h, heads, 50, 4 * h, seq, activation)
    assert sum(saved.values()) == mm.layer_activation_bytes(shape, rows, seq, 4, kv_kept=False,
                                                             dropout=False, padded=False)


def test_the_plan_knows_whether_the_policy_forward_keeps_hfs_kv_cache():
    from rlhf.forward import token_logprobs

    model = AutoModelForCausalLM.from_config(TINY_ARCHS["gpt2"]).eval()
    kept = []
    model.register_forward_hook(lambda m, args, out: kept.append(out.past_key_values is not None))
    ids = torch.randint(0, 97, (2, 8))
    token_logprobs(model, ids, torch.ones_like(ids))
    assert kept == [CAUSAL_LM_FORWARD_KEEPS_KV], "rlhf.forward changed use_cache: update rlhf/memory_math.py"


def test_the_vllm_share_is_the_engines():
    from actors.engines.vllm_engine import llm_kwargs

    default = inspect.signature(llm_kwargs).parameters["gpu_memory_utilization"].default
    assert default == VLLM_GPU_MEMORY_UTILIZATION


def test_peak_helper_reads_known_allocations():
    keep = torch.zeros(250_000)  # 1 MB alive before

    def work():
        a = torch.ones(500_000)   # 2 MB
        b = a * 2                  # 2 MB more: the peak, 4 MB on top
        del a
        c = b[:250_000].clone()    # 1 MB while b is alive: 3 MB
        return c                   # b goes: 1 MB left
    before = live_tensor_bytes()
    out, peak = measure_peak(work)
    assert peak.baseline == before >= keep.nbytes
    assert 4_000_000 <= peak.growth < 4_000_000 + 1024  # the profiler itself allocates a few bytes
    assert 1_000_000 <= peak.end < 1_000_000 + 1024 and out.nbytes == 1_000_000


def test_state_arithmetic_of_a_6b_model():
    """float32 weights + 2 gradient buffers + Adam = 20 bytes/param per replica; fsdp divides it."""
    gptj = mm.KNOWN_SHAPES["EleutherAI/gpt-j-6b"]
    p = gptj.params("scalar")
    ddp = mm.train_state(gptj, "scalar", 4, 8, sharded=False, grad_copies=2, resident_grad_copies=1,
                         ema=False, cuda=True)
    assert ddp.master + ddp.compute_copy + ddp.grads + ddp.optimizer == 20 * p
    fsdp = mm.train_state(gptj, "scalar", 2, 8, sharded=True, grad_copies=2, resident_grad_copies=1,
                          ema=False, cuda=True)
    assert fsdp.master + fsdp.grads + fsdp.optimizer == pytest.approx(20 * p / 8)
    assert fsdp.compute_copy == 2 * (gptj.root_params("scalar") + 2 * gptj.block_params())
    assert fsdp.grads_gathered == 4 * (gptj.root_params("scalar") + gptj.block_params())
    bf16_ddp = mm.train_state(gptj, "scalar", 2, 8, sharded=False, grad_copies=2, resident_grad_copies=1,
                              ema=False, cuda=True)
    assert bf16_ddp.compute_copy == 2 * p  # autocast's casts, kept for backward


@pytest.mark.parametrize("preset", [
    "instructgpt-1.3b",
    "instructgpt-6b",
    "instructgpt-175b",
])
def test_each_paper_preset_fits_80gb_gpus(preset):
    cfg = _preset(preset)
    plan = memory_plan(cfg)
    assert plan.capacity == 80e9 and plan.problems() == []
    assert {r.role for r in plan.roles} >= {"learner", "critic", "reward", "reference", "generator", "sft", "rm"}
    assert all(0 < r.total <= plan.capacity for r in plan.roles)


@pytest.mark.parametrize("overrides, role, field", [
    (["resources.strategy=ddp"], "critic learner", "ppo.num_learners"),
    (["model.dtype=float32", "resources.activation_checkpointing=false"], "policy learner", "ppo.num_learners"),
    (["rm.num_workers=1"], "RM trainer", "rm.num_workers"),
    (["resources.gpu_memory_gb=24"], "reward scorer", "model.reward"),
    (["model.dtype=float32", "resources.gpu_memory_gb=40"], "reference scorer", "model.dtype"),
])
def test_a_layout_that_does_not_fit_is_refused_naming_the_role(overrides, role, field):
    cfg = load_config("instructgpt-1.3b", overrides)  # loads: --dry-run prints the plan, eval still runs
    with pytest.raises(ConfigError) as e:
        require_trainable(cfg)  # training is what would not fit
    line = next(line for line in str(e.value).splitlines() if f"{role} needs " in line)
    assert f": {field} = " in line and " GB over the " in line and " GB GPU" in line


@pytest.mark.parametrize("override, role", [
    ("ppo.num_reference_scorers=4", "reference scorer"),
    ("ppo.num_learners=64", "policy learner"),
    ("sft.num_workers=32", "SFT trainer"),
])
def test_175b_fits_only_sharded_that_wide(override, role):
    """The 175B layout's sharding is what makes it fit: a quarter of the reference's ranks,
    half the learners (the paper's one episode per rank) or half the SFT workers do not."""
    cfg = load_config("instructgpt-175b", [override])
    with pytest.raises(ConfigError) as e:
        require_trainable(cfg)
    line = next(line for line in str(e.value).splitlines() if f"{role} needs " in line)
    assert line.startswith(f"command line: {override.replace('=', ' = ')}: ")


def test_too_few_gpus_are_refused_with_each_role_counted():
    with pytest.raises(ConfigError) as e:
        load_config("instructgpt-175b", ["resources.num_gpus=300"])
    msg = str(e.value)
    assert "resources.num_gpus = 300" in msg and "need 401 GPUs" in msg
    assert "reference scorer 16" in msg and "policy learner 128" in msg and "rollout generator 128" in msg


def test_cpu_runs_have_no_gpu_budget():
    cfg = load_config("tiny", ["resources.gpu_memory_gb=0.001"])  # loads: no GPU, nothing to refuse
    assert memory_plan(cfg).problems()  # the plan itself still says it would not fit
