"""The memory plan against measured peak memory of real CPU steps of the policy learner.

A `PolicyLearner` (the real class, outside Ray, world size 1: a rank's memory does not
depend on the group under ddp) takes one PPO-ptx step on its share of a minibatch of
the preset (configs/tiny.yaml, configs/small.yaml): PPO forward+backward, ptx
forward+backward into the same gradients, the bucket capture, Adam, EMA. Rows are
full-length (max prompt + max response tokens, one left-padded prompt), the plan's
worst case. The peak is measured by `rlhf.memory_measure` (live tensor storages at
the start plus the CPU allocator's events during the step) relative to the tensors
alive before the learner was built, after a first step has made Adam's state. The
plan's training phase must be within 25% of it; so must its scoring phase
(`logprobs` on the rows one forward of the learner scores).
"""
from __future__ import annotations

import time

import pytest
import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

from rlhf.collate import LMBatch
from rlhf.config import load_config
from rlhf.experience import Experience
from rlhf.memory_measure import live_tensor_bytes, measure_peak
from rlhf.memory_plan import learner_scoring_rows, memory_plan
from rlhf.sharding import TrainLayout

pytestmark = pytest.mark.slow
transformers.logging.set_verbosity_error()
TOLERANCE = 0.25


def _experience(cfg, rows: int, gen: torch.Generator) -> Experience:
    m = cfg.model
    seq = m.max_prompt_tokens + m.max_response_tokens
    ids = torch.randint(3, m.tiny.vocab_size, (rows, seq), generator=gen)
    attn = torch.ones_like(ids)
    attn[0, :5] = 0  # a left-padded prompt: the padding mask the plan counts
    act = torch.zeros_like(ids)
    act[:, m.max_prompt_tokens:] = 1
    zero = torch.zeros(rows, seq)
    adv = torch.randn(rows, seq, generator=gen) * act
    return Experience(ids, attn, act, zero - 5.0, zero - 5.0, zero, adv, zero + act, weight_version=0)


def _ptx(cfg, rows: int, gen: torch.Generator) -> LMBatch:
    ids = torch.randint(3, cfg.model.tiny.vocab_size, (rows, cfg.ptx_block_tokens), generator=gen)
    ones = torch.ones_like(ids)
    return LMBatch(ids, ones, ones.float())


@pytest.mark.parametrize("preset, overrides", [
    ("tiny", []),
    ("tiny", ["resources.activation_checkpointing=true", "ppo.micro_batch_size=8"]),
    ("small", []),
])
def test_plan_holds_against_a_measured_learner_step(tmp_path, preset, overrides):
    torch.set_num_threads(1)
    cfg = load_config(preset, overrides)
    t, p = cfg.model.tiny, cfg.ppo
    GPT2LMHeadModel(GPT2Config(vocab_size=t.vocab_size, n_layer=t.n_layer, n_head=t.n_head, n_embd=t.n_embd,
                               n_positions=t.n_positions)).save_pretrained(tmp_path)
    plan = next(r for r in memory_plan(cfg).roles if r.role == "learner")
    rows = p.minibatch_size // p.num_learners
    gen = torch.Generator().manual_seed(0)

    from actors.policy_learner import PolicyLearner
    before = live_tensor_bytes()
    learner = PolicyLearner(str(tmp_path), ppo=p, optimizer=cfg.optimizer, device="cpu", num_threads=1,
                            layout=TrainLayout.of(cfg))
    learner.train_minibatch(_experience(cfg, 1, gen), _ptx(cfg, p.ptx_ratio, gen))  # Adam's state exists now
    exp, ptx = _experience(cfg, rows, gen), _ptx(cfg, p.ptx_ratio * rows, gen)
    start = time.perf_counter()
    _, step = measure_peak(lambda: learner.train_minibatch(exp, ptx))
    seconds = time.perf_counter() - start
    measured = step.peak - before
    print(f"\n{preset} {overrides}: step peak measured {measured / 1e6:.1f} MB, planned {plan.at['train'] / 1e6:.1f}"
          f" MB (ratio {measured / plan.at['train']:.3f}; {seconds:.1f} s; the plan's peak phase: {plan.phase})")
    assert abs(measured / plan.at["train"] - 1) <= TOLERANCE
    assert plan.total == max(plan.at.values())  # the role's figure is its largest phase, whichever that is

    if overrides:
        return
    score = _experience(cfg, learner_scoring_rows(cfg), gen)
    _, scoring = measure_peak(lambda: learner.logprobs(score.input_ids, score.attention_mask))
    measured = scoring.peak - before
    print(f"{preset}: scoring peak measured {measured / 1e6:.1f} MB, planned {plan.at['score'] / 1e6:.1f} MB")
    assert abs(measured / plan.at["score"] - 1) <= TOLERANCE
