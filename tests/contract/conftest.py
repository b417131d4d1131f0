"""Contract tests: our calls against the real vllm==0.33.0 package, without a GPU.

vLLM is installed with `scripts/install_vllm_contract.sh` (the wheel with
--no-deps plus the pure-Python modules it imports on CPU); where it is absent the
vLLM tests skip. A stand-in can only ever replace vLLM's `LLM` itself (it needs a
GPU to construct), and only as `create_autospec(LLM)`, which enforces the real
signatures on every call our code makes.
"""
from __future__ import annotations

import pytest

from rlhf.tiny import build_tiny_model, train_tokenizer

TEXTS = ["reverse the words: a b c", "sort the letters: c a b", "copy: hello world"] * 4


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return train_tokenizer(TEXTS, vocab_size=300, model_max_length=32)


@pytest.fixture(scope="session")
def tiny_policy_dir(tmp_path_factory, tiny_tokenizer):
    """A saved HF directory (tokenizer + tied-embedding GPT-2) as the generators load it."""
    out = tmp_path_factory.mktemp("tiny_policy")
    model = build_tiny_model(tiny_tokenizer, n_layer=1, n_head=2, n_embd=16, n_positions=32, seed=0)
    tiny_tokenizer.save_pretrained(out)
    model.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture()
def tiny_models(tiny_tokenizer):
    """(learner, receiver): two tiny GPT-2s with different weights."""
    kw = dict(n_layer=1, n_head=2, n_embd=16, n_positions=32)
    return build_tiny_model(tiny_tokenizer, seed=1, **kw), build_tiny_model(tiny_tokenizer, seed=2, **kw)
