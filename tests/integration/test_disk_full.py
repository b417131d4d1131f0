"""A disk that fills during a PPO run (issue: reliability): a real size-limited tmpfs.

The run folder lives on a tmpfs the test mounts (skipped where mounting is not allowed),
with a ballast file taking all but a measured amount of its space:
1. room for one checkpoint, not two: the second checkpoint fails with a clear error
   naming its path, the first is intact and loadable, no half-written folder is left;
2. room for that checkpoint, not the final model: the final save fails the same way;
3. room again: `--resume` finishes the run, with exactly the uninterrupted run's metrics.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from orchestration import cli
from orchestration.ppo import checkpoints
from orchestration.rundir import StageDir, read_metrics
from tests.integration.conftest import FAULT_RUN, assert_same_run

pytestmark = pytest.mark.slow
MiB = 2 ** 20


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


class Ballast:
    """One file that takes all of the filesystem's space but `leave` bytes."""

    def __init__(self, folder: Path):
        self.path = folder / "ballast"

    def fill(self, leave: int) -> None:
        self.clear()
        free = os.statvfs(self.path.parent).f_bavail * os.statvfs(self.path.parent).f_frsize
        with open(self.path, "wb") as f:
            os.posix_fallocate(f.fileno(), 0, max(free - leave, 0))

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def test_a_full_disk_stops_the_run_cleanly_and_resume_finishes_it(
        fault_reference, tiny_config, tiny_ppo_inputs, small_disk, tmp_path, capsys):
    ref_cfg, reference = fault_reference
    ref_stage = StageDir(ref_cfg.output_dir, "ppo")
    checkpoint = _size(ref_stage.checkpoints / "step_00000002")
    final = _size(ref_stage.final)

    cfg = tiny_config(small_disk / "run", *FAULT_RUN)
    tiny_ppo_inputs(cfg.output_dir, cfg)
    cfg_file = tmp_path / "config.yaml"
    cfg_file.write_text(cfg.to_yaml())
    stage, ballast = StageDir(cfg.output_dir, "ppo"), Ballast(small_disk)

    # 1. Room for one checkpoint and a half: the one after iteration 4 does not fit.
    ballast.fill(leave=int(1.5 * checkpoint) + MiB // 4)
    assert cli.main(["ppo", str(cfg_file)]) == 3
    err = capsys.readouterr().err
    step2, step4 = stage.checkpoints / "step_00000002", stage.checkpoints / "step_00000004"
    assert f"no space left on the device writing {step4}" in err and f"{step2} intact" in err, err
    assert "--resume" in err and "Traceback" not in err
    assert stage.latest_checkpoint() == step2 and not list(stage.checkpoints.glob(".*"))
    assert checkpoints.load_latest(stage).driver["iteration"] == 2  # intact and loadable
    assert not stage.is_done()

    # 2. Room for that checkpoint, not for the final model.
    ballast.fill(leave=checkpoint + final // 2)  # a few KiB of metrics and TensorBoard fit beside
    assert cli.main(["ppo", str(cfg_file), "--resume"]) == 3
    err = capsys.readouterr().err
    assert f"no space left on the device writing {stage.final}" in err, err
    assert stage.latest_checkpoint() == step4 and not stage.is_done()
    assert not list(stage.path.glob(".final.tmp-*"))

    # 3. Space again: the run finishes as if nothing had happened.
    ballast.clear()
    assert cli.main(["ppo", str(cfg_file), "--resume"]) == 0
    assert stage.is_done()
    assert_same_run(read_metrics(stage.metrics_file), reference)
