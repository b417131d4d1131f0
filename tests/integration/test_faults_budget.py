"""Out-of-memory guard: a generator's sampling passes stay within its token budget.

Observed from the model's own forward calls (`RolloutGenerator.generation_passes`):
rows and KV-cache positions of each pass, whatever the engine does inside.
"""
from __future__ import annotations

import pytest

from actors.generator import RolloutGenerator

PROMPTS = ["the red fox", "a", "one two three four five six seven", "sort: 3 1 2 ->", "hill",
           "reverse: a b c d e f ->", "copy: x y", "the quick brown fox jumps over the lazy dog again"]
NEW = 8


@pytest.fixture(scope="module")
def policy_dir(tiny_tokenizer, tmp_path_factory):
    from rlhf.tiny import build_tiny_model

    path = tmp_path_factory.mktemp("policy")
    build_tiny_model(tiny_tokenizer, n_layer=1, n_head=2, n_embd=32, n_positions=96, seed=0).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return str(path)


def _generate(policy_dir, tok, **engine_kwargs):
    gen = RolloutGenerator(policy_dir, engine="hf", seed=0, num_threads=1, device="cpu",
                           engine_kwargs=engine_kwargs)
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    rollout = gen.generate(ids, PROMPTS, NEW, seed=1)
    return rollout, gen.generation_passes(), ids


def test_generation_passes_stay_within_the_token_budget(policy_dir, tiny_tokenizer):
    budget = 60
    rollout, passes, ids = _generate(policy_dir, tiny_tokenizer, token_budget=budget)
    assert len(rollout) == len(PROMPTS) and rollout.prompts == PROMPTS  # every prompt answered
    assert sum(rows for rows, _ in passes) == len(PROMPTS)
    assert len(passes) > 1
    widest = max(len(i) for i in ids)
    assert widest + NEW <= budget  # so no single row may exceed it
    for rows, positions in passes:
        assert rows * positions <= budget, passes


def test_without_a_tight_budget_it_is_one_pass_of_the_whole_batch(policy_dir, tiny_tokenizer):
    _, passes, ids = _generate(policy_dir, tiny_tokenizer)  # default budget: 65536 tokens
    assert passes == [(len(PROMPTS), max(len(i) for i in ids) + NEW)]
