"""Shared fixtures: one local Ray instance and one tiny pipeline run (stages 0-2) per session.

`TorchTrainer.fit()` costs ~20 s of fixed start-up, so the stage tests share one
run and check different things on it; pure parts are tested by direct calls.
"""
from __future__ import annotations

import math

import pytest
import torch

from rlhf.config import Config, load_config
from rlhf.synthetic import tokenizer_training_text
from rlhf.tiny import build_tiny_model, train_tokenizer

# A few dozen steps per stage on a 1-layer, 32-wide model; a few hundred examples.
TINY = [
    "model.tiny.vocab_size=400", "model.tiny.n_layer=1", "model.tiny.n_head=2", "model.tiny.n_embd=32",
    "model.tiny.n_positions=96", "model.context_length=96", "model.max_prompt_tokens=64",
    "model.max_response_tokens=16",
    "data.synthetic.num_demonstrations=192", "data.synthetic.num_comparisons=96",
    "data.synthetic.num_prompts=32", "data.synthetic.num_pretrain_docs=300",
    "data.synthetic.num_eval_prompts=48", "data.synthetic.num_eval_comparisons=48", "eval.num_pretrain_docs=60",
    "pretrain.steps=16", "pretrain.batch_size=16", "pretrain.seq_len=64", "pretrain.lr=5e-3",
    "sft.epochs=2", "sft.batch_size=16", "rm.batch_size=8", "data.synthetic.policy_comparisons=24",
]
# The shared run trains SFT and the RM on 2 DDP workers, SFT without dropout so
# that tests/integration/test_ddp.py can compare its curve with one worker's.
SHARED_RUN = ["sft.num_workers=2", "sft.resid_pdrop=0.0", "rm.num_workers=2"]


def _tiny_config(output_dir, *overrides: str) -> Config:
    return load_config("tiny", [*TINY, f"run.output_dir={output_dir}", *overrides])


@pytest.fixture(scope="session")
def tiny_config():
    """tiny_config(output_dir, *overrides) -> the tiny test Config."""
    return _tiny_config


@pytest.fixture(scope="session")
def ray_local():
    import ray

    from orchestration.cluster import ACTOR_ENV, WORKER_ONLY_ENV

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False,
             runtime_env={"env_vars": ACTOR_ENV | WORKER_ONLY_ENV})  # as `instructray` starts one
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_run(ray_local, tmp_path_factory):
    """(config, {step: summary}) of pretrain -> SFT -> RM -> SFT selection on Ray Train."""
    from orchestration import pipeline

    cfg = _tiny_config(tmp_path_factory.mktemp("tiny_run"), *SHARED_RUN)
    stages_0_2 = [s for s in pipeline.STEPS if s.name in ("pretrain", "sft", "rm", "sft_select")]
    return cfg, pipeline.main(cfg, steps=stages_0_2)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return train_tokenizer(tokenizer_training_text(0, n_docs=200), vocab_size=400, model_max_length=96)


@pytest.fixture
def tiny_lm(tiny_tokenizer):
    torch.manual_seed(0)
    return build_tiny_model(tiny_tokenizer, n_layer=1, n_head=2, n_embd=32, n_positions=96, seed=0)


def _write_tiny_ppo_inputs(root, cfg: Config, rm_head_fill: float | None = None) -> None:
    """An untrained tiny SFT policy (sft/final) and RM (rm/final), saved as stages 1-2 save theirs.

    rm_head_fill: overwrite the RM's scalar head with this value (e.g. nan) in the saved
    checkpoint, to feed non-finite rewards through the real data path.
    """
    from orchestration.rundir import StageDir, atomic_write_dir
    from rlhf.models import ScalarModel

    tok = train_tokenizer(tokenizer_training_text(0, n_docs=300), vocab_size=cfg.model.tiny.vocab_size)
    policy = build_tiny_model(tok, n_layer=1, n_head=2, n_embd=32, n_positions=96, seed=0)
    rm = ScalarModel.from_causal_lm(policy, seed=1)
    if rm_head_fill is not None:
        with torch.no_grad():
            rm.head.weight.fill_(rm_head_fill)

    def save(model):
        def write(d):
            model.save_pretrained(d)
            tok.save_pretrained(d)
        return write

    atomic_write_dir(StageDir(root, "sft").final, save(policy))
    atomic_write_dir(StageDir(root, "rm").final, save(rm))


@pytest.fixture(scope="session")
def tiny_ppo_inputs():
    """tiny_ppo_inputs(root, cfg, rm_head_fill=None): writes sft/final and rm/final under root."""
    return _write_tiny_ppo_inputs


# 4 iterations of 16 episodes; checkpoints after iterations 2 and 4, so a critic
# restart has calls to replay and a learner loss in iteration 3 rewinds one iteration.
# The small token budget splits generation into many passes: a kill lands mid-call.
FAULT_RUN = ["ppo.episodes=64", "ppo.batch_size=16", "ppo.minibatch_size=8", "ppo.num_generators=2",
             "ppo.num_learners=2", "ppo.checkpoint_every=2", "ppo.compare_ptx=false",
             "ppo.ptx_seq_len=32", "ppo.ptx_ratio=2", "ppo.generation_token_budget=64",
             "ppo.max_restarts=3",
             "data.synthetic.num_prompts=64", "data.synthetic.num_pretrain_docs=200"]
WALL_CLOCK = {"time", "tokens_per_second", "generated_tokens_per_second"}


def _comparable(row: dict) -> dict:
    return {k: v for k, v in row.items()
            if k not in WALL_CLOCK and not k.startswith("seconds_") and not k.endswith("_restarts")}


def _same(a, b) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def assert_same_run(rows: list[dict], ref: list[dict]) -> None:
    assert [r["step"] for r in rows] == [r["step"] for r in ref]
    for got, want in zip(rows, ref):
        got, want = _comparable(got), _comparable(want)
        assert got.keys() == want.keys()
        diff = {k: (got[k], want[k]) for k in got if not _same(got[k], want[k])}
        assert not diff, f"iteration {got['step']} differs: {diff}"


@pytest.fixture(scope="session")
def fault_reference(ray_local, tmp_path_factory):
    """(config, metrics rows) of the uninterrupted FAULT_RUN, which every faulted run must equal;
    one run per session, shared by the fault and full-disk tests."""
    from orchestration.rundir import StageDir, read_metrics
    from orchestration.stages import ppo

    root = tmp_path_factory.mktemp("fault_reference")
    cfg = _tiny_config(root, *FAULT_RUN)
    _write_tiny_ppo_inputs(root, cfg)
    ppo.main(cfg)
    return cfg, read_metrics(StageDir(root, "ppo").metrics_file)


def _write_actor_models(root, texts: list[str], reward_bias: float = 0.0) -> dict:
    """A 1-layer policy (tokenizer trained on `texts`) and its RM with bias `reward_bias`."""
    from rlhf.models import ScalarModel

    tok = train_tokenizer(texts, vocab_size=300)
    policy = build_tiny_model(tok, n_layer=1, n_head=2, n_embd=32, n_positions=64, seed=0)
    tok.save_pretrained(root / "policy")
    policy.save_pretrained(root / "policy")
    rm = ScalarModel.from_causal_lm(policy, seed=1)
    rm.reward_bias = reward_bias
    rm.save_pretrained(root / "rm")
    return {"policy": str(root / "policy"), "rm": str(root / "rm"), "tok": tok}


@pytest.fixture(scope="session")
def actor_models():
    """actor_models(root, texts, reward_bias=0.0) -> {policy, rm, tok}: tiny models saved under root."""
    return _write_actor_models


# Rows 0-3 have 1-2 response tokens each, rows 4-7 have 6-7: split over 2 ranks, the shards
# hold very different token counts (what the learners' global token means must handle).
RAGGED_PROMPTS = ["the red", "a blue bird", "one two", "the", "six five four", "a", "fox runs", "hill sings"]
RAGGED_LENGTHS = [1, 2, 1, 2, 7, 6, 7, 6]


def _ragged_batch(tok) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, attention mask, action mask): right-padded prompt + random-response rows."""
    g = torch.Generator().manual_seed(0)
    rows = [tok(p)["input_ids"] + torch.randint(3, len(tok), (n,), generator=g).tolist()
            for p, n in zip(RAGGED_PROMPTS, RAGGED_LENGTHS)]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tok.pad_token_id)
    attn, act = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (row, n) in enumerate(zip(rows, RAGGED_LENGTHS)):
        ids[i, :len(row)] = torch.tensor(row)
        attn[i, :len(row)] = 1
        act[i, len(row) - n:len(row)] = 1
    return ids, attn, act


@pytest.fixture(scope="session")
def ragged_batch():
    """ragged_batch(tok) -> (ids, attention mask, action mask) of 8 rows of uneven response lengths."""
    return _ragged_batch
