"""PPO checkpoints on disk: everything a resumed run needs to repeat the uninterrupted one.

    checkpoints/step_XXXXXXXX/policy.pt   learner rank 0: weights, Adam, LR schedule, EMA,
                                          weight version, non-finite count, RNG
                              critic.pt   critic rank 0: the same, without EMA
                              driver.pt   iteration, data-stream positions, RNG, non-finite streak
                              COMPLETE    written last (rundir.atomic_write_dir)

Only folders with COMPLETE are ever loaded; a driver killed mid-write leaves a
`.step_X.tmp-PID` folder, which the next resume removes. Files are read with
`weights_only=True` (rlhf.models.load_state_file): tensors and plain containers, never code.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import torch

from orchestration.rundir import StageDir
from rlhf.models import load_state_file

log = logging.getLogger(__name__)

FILES = ("policy.pt", "critic.pt", "driver.pt")


def save(stage: StageDir, iteration: int, states: dict[str, dict]) -> Path:
    """states: file name -> state, for every name in FILES."""
    def write(tmp: Path) -> None:
        for i, name in enumerate(FILES):
            if i:
                _pause_for_tests()
            torch.save(states[name], tmp / name)
    return stage.save_checkpoint(iteration, write)


def load(ckpt: Path) -> dict[str, dict]:
    return {name: load_state_file(ckpt / name) for name in FILES}


def load_latest(stage: StageDir) -> dict[str, dict] | None:
    """Every file of the newest complete checkpoint, after removing half-written ones; None before the first."""
    remove_half_written(stage)
    ckpt = stage.latest_checkpoint()
    return load(ckpt) if ckpt is not None else None


def latest(stage: StageDir, name: str) -> dict | None:
    """One file of the newest complete checkpoint; None before the first."""
    ckpt = stage.latest_checkpoint()
    return load_state_file(ckpt / name) if ckpt is not None else None


def remove_half_written(stage: StageDir) -> None:
    """Temporary folders of a driver that died mid-write: never loaded, now removed."""
    if stage.checkpoints.exists():
        for tmp in stage.checkpoints.glob(".step_*.tmp-*"):
            if tmp.name.rsplit("-", 1)[-1] != str(os.getpid()):
                log.warning("removing half-written checkpoint %s", tmp)
                shutil.rmtree(tmp, ignore_errors=True)


def _pause_for_tests() -> None:
    """Test hook: INSTRUCTRAY_TEST_CHECKPOINT_PAUSE_S makes the writer sleep after the first
    file, so a test can SIGKILL the driver mid-write (tests/integration/test_faults_ppo.py).
    Unset (always, outside that test): no effect."""
    pause = float(os.environ.get("INSTRUCTRAY_TEST_CHECKPOINT_PAUSE_S", "0") or 0)
    if pause > 0:
        time.sleep(pause)
