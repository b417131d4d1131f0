"""Stage 3 with FSDP2 learners: a whole PPO-ptx run on 2 sharded policy and critic ranks,
its sharded checkpoints, and a resume from one that repeats the uninterrupted run.

The run goes 3 iterations with a checkpoint after each; the newest checkpoint and the
final policy are then removed, and `ppo.main(resume=True)` redoes iteration 3 from the
iteration-2 checkpoint: its metrics row must equal the original one (apart from wall
clock), and so must the final weights.
"""
import shutil

import pytest
import torch

from orchestration.rundir import StageDir, read_metrics
from orchestration.stages import ppo
from rlhf.models import load_policy

pytestmark = pytest.mark.slow

RUN = ["ppo.episodes=48", "ppo.batch_size=16", "ppo.minibatch_size=8", "ppo.num_generators=1",
       "ppo.num_learners=2", "ppo.checkpoint_every=1", "ppo.compare_ptx=false",
       "ppo.ptx_seq_len=32", "ppo.ptx_ratio=2", "ppo.micro_batch_size=2", "model.max_response_tokens=8",
       "resources.strategy=fsdp", "data.synthetic.num_prompts=64", "data.synthetic.num_pretrain_docs=200"]
WALL_CLOCK = {"time", "tokens_per_second", "generated_tokens_per_second"}


def _comparable(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in WALL_CLOCK and not k.startswith("seconds_")}


def test_sharded_ppo_run_checkpoints_and_resumes_exactly(ray_local, tiny_config, tiny_ppo_inputs, tmp_path):
    cfg = tiny_config(tmp_path, *RUN)
    tiny_ppo_inputs(tmp_path, cfg)
    (final,) = ppo.main(cfg)
    stage = StageDir(cfg.output_dir, "ppo")
    rows = read_metrics(stage.metrics_file)
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert all(r["ppo_grad_norm"] > 0 and r["ptx_grad_norm"] > 0 and r["skipped_steps"] == 0 for r in rows)
    assert rows[0]["synced_checksum"] != rows[-1]["synced_checksum"]

    last = stage.latest_checkpoint()
    names = {p.name for p in last.iterdir()}
    assert {"policy", "critic", "driver.pt", "COMPLETE"} <= names and "policy.pt" not in names
    shards = {p.name for p in (last / "policy").iterdir()}
    assert {".metadata", "rank0.pt", "rank1.pt"} <= shards

    want = dict(load_policy(final).named_parameters())
    shutil.rmtree(last)
    shutil.rmtree(final)
    ppo.main(cfg, resume=True)
    again = read_metrics(stage.metrics_file)
    assert [r["iteration"] for r in again] == [0, 1, 2]
    assert [_comparable(r) for r in again] == [_comparable(r) for r in rows]
    got = dict(load_policy(final).named_parameters())
    assert all(torch.equal(got[n], want[n]) for n in want)
