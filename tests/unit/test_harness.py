"""Pure parts of the stage harness: data order, sharding, loss shares, metric truncation."""
import json
from pathlib import Path

import pytest
import torch

from orchestration.rundir import MetricsLogger, StageDir, read_metrics, truncate_metrics
from orchestration.stages.checkpointing import TrainState
from orchestration.stages.harness import WorkerContext, epoch_batches, stream_batch
from rlhf.config import Config
from rlhf.masked import global_share


def test_epoch_batches_cover_each_item_once_and_depend_on_seed_and_epoch():
    batches = epoch_batches(10, 3, seed=0, epoch=0)
    assert [len(b) for b in batches] == [3, 3, 3]  # the partial last batch is dropped
    flat = [i for b in batches for i in b]
    assert len(set(flat)) == 9 and set(flat) <= set(range(10))
    assert epoch_batches(10, 3, seed=0, epoch=0) == batches  # deterministic
    assert epoch_batches(10, 3, seed=0, epoch=1) != batches
    assert epoch_batches(10, 3, seed=1, epoch=0) != batches


def test_epoch_batches_refuse_less_than_one_batch():
    with pytest.raises(ValueError, match="less than one batch"):
        epoch_batches(2, 3, seed=0, epoch=0)


def test_stream_batch_walks_through_consecutive_epochs():
    expected = epoch_batches(7, 2, 5, 0) + epoch_batches(7, 2, 5, 1)
    assert [stream_batch(7, 2, 5, step) for step in range(6)] == expected


def _ctx(rank, world):
    return WorkerContext(Config(), StageDir("/nonexistent", "x"), rank=rank, world=world)


@pytest.mark.parametrize("n,world", [(8, 2), (7, 2), (3, 2), (10, 3), (5, 1)])
def test_shards_partition_the_global_batch_in_order(n, world):
    items = list(range(100, 100 + n))
    shards = [_ctx(r, world).shard(items) for r in range(world)]
    assert [x for s in shards for x in s] == items
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_global_share_makes_the_ddp_average_the_global_mean():
    # Per-token losses split unevenly between 3 workers.
    parts = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0, 5.0, 6.0]), torch.tensor([10.0])]
    world, total = len(parts), sum(len(p) for p in parts)
    ddp_average = sum(p.mean() * global_share(len(p), total, world) for p in parts) / world
    assert float(ddp_average) == pytest.approx(float(torch.cat(parts).mean()))
    assert global_share(3, 0, 2) == 0.0


def test_train_state_counts_steps_and_resets_position_each_epoch():
    s = TrainState()
    s.next_step(), s.next_step()
    assert (s.step, s.epoch, s.batch_in_epoch) == (2, 0, 2)
    s.next_epoch()
    s.next_step()
    assert (s.step, s.epoch, s.batch_in_epoch) == (3, 1, 1)


def test_truncate_metrics_keeps_rows_before_the_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 1.0 / (s + 1)} for s in (0, 1, 2, 2, 3, 4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert truncate_metrics(path, 3) == 4
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 1, 2, 2]
    assert truncate_metrics(tmp_path / "absent.jsonl", 5) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temporary left behind


def test_truncate_metrics_failing_mid_way_leaves_the_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    text = "".join(json.dumps({"step": s}) + "\n" for s in range(5))
    path.write_text(text)

    def disk_full(self, target):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(Path, "replace", disk_full)
    with pytest.raises(OSError):
        truncate_metrics(path, 2)
    assert path.read_text() == text
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


def test_a_logger_keeps_writing_to_the_metrics_file_after_it_is_truncated(tmp_path):
    stage = StageDir(tmp_path, "ppo")
    logger = MetricsLogger(stage, tensorboard=False)
    for step in range(3):
        logger.log(step, loss=1.0)
    truncate_metrics(stage.metrics_file, 1)  # a rewind to step 1, with the logger still open
    logger.log(1, loss=0.5)
    logger.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(stage.metrics_file)] == [(0, 1.0), (1, 0.5)]
