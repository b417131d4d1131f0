"""Weights & Biases beside TensorBoard (`run.wandb: offline`) on a real stage on Ray Train.

The offline run file is read back here record by record (W&B's log format: 32 KiB
blocks of [crc32c, length, type] + protobuf `Record`), so the test sees what
`wandb sync` would upload: the stage's metrics at their steps and the config, once.
"""
from __future__ import annotations

import json
import struct

import pytest

from orchestration.rundir import StageDir, read_metrics
from orchestration.stages import pretrain

wandb = pytest.importorskip("wandb")
pytestmark = pytest.mark.slow
BLOCK, HEADER = 32768, 7


def _records(path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    out, pos, parts = [], HEADER, b""
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        parts += data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind in (1, 4):  # a FULL record, or the LAST piece of one
            rec = pb.Record()
            rec.ParseFromString(parts)
            out.append(rec)
            parts = b""
    return out


def test_a_stage_logs_its_metrics_and_config_to_an_offline_wandb_run(ray_local, tiny_config, tmp_path):
    cfg = tiny_config(tmp_path / "run", "run.wandb=offline", "pretrain.steps=6")
    pretrain.main(cfg)
    files = list((cfg.output_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    records = _records(files[0])
    history = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            history[items["_step"]] = items
    ours = {row["step"]: row for row in read_metrics(StageDir(cfg.output_dir, "pretrain").metrics_file)}
    assert sorted(history) == sorted(ours)
    for step, row in ours.items():
        for key, value in row.items():
            if key not in ("step", "time") and isinstance(value, (int, float)):
                assert history[step][key] == pytest.approx(value, rel=1e-6), (step, key)
    runs = [r for r in records if r.WhichOneof("record_type") == "run"]
    assert len(runs) == 1 and runs[0].run.run_id.startswith(f"{cfg.output_dir.name}-pretrain-")
    logged = {i.key: json.loads(i.value_json) for i in runs[0].run.config.update}
    assert logged["pretrain"]["steps"] == 6 and logged["run"]["wandb"] == "offline"
    assert logged["model"] == cfg.model.model_dump(mode="json")
