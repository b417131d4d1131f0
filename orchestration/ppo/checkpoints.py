"""PPO checkpoints on disk: everything a resumed run needs to repeat the uninterrupted one.

    checkpoints/step_XXXXXXXX/policy.pt   policy group, ddp (rank 0 writes its replica): weights,
                                          Adam, LR schedule, EMA, weight version, counters, RNG
                              policy/     policy group, fsdp: every rank's shards of the same
                                          (rlhf/dist_checkpoint.py)
                              critic.pt   critic group: the same, without EMA (critic/ for fsdp)
                              driver.pt   iteration, data-stream positions, RNG, non-finite streak
                              COMPLETE    written last (rundir.atomic_write_dir)

The groups' actors write their files themselves into the temporary folder, so the
run directory must be on storage every learner's node can reach (as for the Ray
Train stages). Only folders with COMPLETE are ever loaded; a driver killed mid-write
leaves a `.step_X.tmp-PID` folder, which the next resume removes. Everything loads
without running code: `weights_only=True` (rlhf.models.load_state_file), and
DCP metadata through a restricted unpickler.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from orchestration.rundir import StageDir
from rlhf.models import load_state_file

log = logging.getLogger(__name__)

DRIVER = "driver.pt"


@dataclass(frozen=True)
class Checkpoint:
    folder: Path    # where the groups' states are (they load them themselves)
    driver: dict    # the driver's own state (driver.pt)


def save(stage: StageDir, iteration: int, write_groups: Callable[[Path], None], driver: dict) -> Path:
    """write_groups(folder) has the learner groups write theirs; then the driver's state."""
    def write(tmp: Path) -> None:
        write_groups(tmp)
        pause_for_tests()
        torch.save(driver, tmp / DRIVER)
    return stage.save_checkpoint(iteration, write)


def load_latest(stage: StageDir) -> Checkpoint | None:
    """The newest complete checkpoint, after removing half-written ones; None before the first."""
    remove_half_written(stage)
    folder = stage.latest_checkpoint()
    return Checkpoint(folder, load_state_file(folder / DRIVER)) if folder is not None else None


def remove_half_written(stage: StageDir) -> None:
    """Temporary folders of a driver that died mid-write: never loaded, now removed."""
    if stage.checkpoints.exists():
        for tmp in stage.checkpoints.glob(".step_*.tmp-*"):
            if tmp.name.rsplit("-", 1)[-1] != str(os.getpid()):
                log.warning("removing half-written checkpoint %s", tmp)
                shutil.rmtree(tmp, ignore_errors=True)


def pause_for_tests() -> None:
    """Test hook: INSTRUCTRAY_TEST_CHECKPOINT_PAUSE_S makes the writer sleep between
    the files, so a test can SIGKILL the driver mid-write (tests/integration/test_faults_ppo.py).
    Unset (always, outside that test): no effect."""
    pause = float(os.environ.get("INSTRUCTRAY_TEST_CHECKPOINT_PAUSE_S", "0") or 0)
    if pause > 0:
        time.sleep(pause)
