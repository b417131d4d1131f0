"""Non-finite losses through the real data path, and a missing input refused before any actor starts.

The reward model's saved scalar head is 3e38 (finite, near float32's max), so its
scores, and the critic's values (the critic starts from the RM), overflow to
inf/nan on every sequence: advantages and returns become non-finite, so do the
policy and value losses and their gradients.
"""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from orchestration.ppo.faults import NonFiniteTraining
from orchestration.rundir import StageDir, read_metrics
from orchestration.stages import ppo
from rlhf.models import load_state_file

pytestmark = pytest.mark.slow

RUN = ["ppo.episodes=48", "ppo.batch_size=16", "ppo.minibatch_size=8", "ppo.num_generators=1",
       "ppo.num_learners=1", "ppo.checkpoint_every=1", "ppo.compare_ptx=false", "ppo.ptx_seq_len=32",
       "ppo.ptx_ratio=2", "ppo.max_nonfinite_steps=3", "model.max_response_tokens=8",
       "data.synthetic.num_prompts=64", "data.synthetic.num_pretrain_docs=200"]


def _assert_unchanged_and_finite(state: dict, saved: dict, prefix: str = "") -> None:
    """Every tensor of a saved HF checkpoint equals (bit for bit) and is finite in `state`."""
    for name, tensor in saved.items():
        assert torch.isfinite(state[prefix + name]).all(), name
        assert torch.equal(state[prefix + name], tensor), f"{name} moved"


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(ray_local, tiny_config, tiny_ppo_inputs, tmp_path):
    cfg = tiny_config(tmp_path, *RUN)
    tiny_ppo_inputs(tmp_path, cfg, rm_head_fill=3e38)
    # 2 minibatches per iteration: iteration 0 skips 2 steps and completes; the 3rd in a row stops.
    with pytest.raises(NonFiniteTraining, match=r"policy: 3 optimizer steps in a row .*ppo.max_nonfinite_steps = 3"):
        ppo.main(cfg)

    stage = StageDir(cfg.output_dir, "ppo")
    rows = read_metrics(stage.metrics_file)
    assert len(rows) == 1 and not stage.is_done()
    assert not math.isfinite(rows[0]["rm_score_mean"])  # the injected fault reached the rewards
    assert (rows[0]["skipped_steps"], rows[0]["critic_skipped_steps"]) == (2, 2)
    assert rows[0]["nonfinite_steps"] == 2 and rows[0]["critic_nonfinite_steps"] == 2

    # The checkpoint after iteration 0: weights (and the EMA) are exactly the initial, finite ones.
    ckpt = stage.latest_checkpoint()
    assert ckpt is not None and ckpt.name == "step_00000001"
    policy, critic = load_state_file(ckpt / "policy.pt"), load_state_file(ckpt / "critic.pt")
    sft = load_file(StageDir(cfg.output_dir, "sft").final / "model.safetensors")
    _assert_unchanged_and_finite(policy["model"], sft)
    _assert_unchanged_and_finite(policy["ema"]["shadow"], sft)
    assert policy["ema"]["num_updates"] == 0
    rm = load_file(StageDir(cfg.output_dir, "rm").final / "model.safetensors")
    _assert_unchanged_and_finite(critic["model"], rm, prefix="model.")  # ScalarModel wraps the HF model


def test_missing_reward_model_is_refused_before_any_actor_starts(ray_local, tiny_config, tiny_ppo_inputs, tmp_path):
    cfg = tiny_config(tmp_path, *RUN)
    tiny_ppo_inputs(tmp_path, cfg)
    rm = StageDir(cfg.output_dir, "rm").final
    (rm / "COMPLETE").unlink()
    with pytest.raises(FileNotFoundError, match=f"ppo: no reward model at {rm}"):
        ppo.main(cfg)
    assert not StageDir(cfg.output_dir, "ppo").path.exists()  # no trainer was built
