"""The run directory: where each stage puts its model, metrics, config and checkpoints.

    <output_dir>/config.yaml          the resolved config of the run
    <output_dir>/<stage>/final/       the stage's HF-format result (written last)
    <output_dir>/<stage>/checkpoints/ resumable state, one folder per save
    <output_dir>/<stage>/metrics.jsonl and tb/ (TensorBoard)

Checkpoints are written into a temporary sibling and renamed into place, so a
crash mid-write never leaves a folder that looks complete.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

from rlhf.config import Config

COMPLETE = "COMPLETE"  # marker file written inside a checkpoint as its last act


class StageDir:
    def __init__(self, root: str | Path, stage: str):
        self.root = Path(root)
        self.path = self.root / stage
        self.final = self.path / "final"
        self.checkpoints = self.path / "checkpoints"
        self.metrics_file = self.path / "metrics.jsonl"
        self.tb_dir = self.path / "tb"

    def is_done(self) -> bool:
        return (self.final / COMPLETE).exists()

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint (half-written ones are ignored)."""
        if not self.checkpoints.exists():
            return None
        done = [p for p in self.checkpoints.iterdir()
                if p.is_dir() and not p.name.startswith(".") and (p / COMPLETE).exists()]
        return max(done, key=lambda p: int(p.name.split("_")[-1]), default=None)

    def save_checkpoint(self, step: int, write: Callable[[Path], None], keep: int = 2) -> Path:
        target = self.checkpoints / f"step_{step:08d}"
        atomic_write_dir(target, write)
        for old in sorted(p for p in self.checkpoints.iterdir()
                          if p.is_dir() and not p.name.startswith("."))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        return target

    def save_final(self, write: Callable[[Path], None]) -> Path:
        atomic_write_dir(self.final, write)
        return self.final


class DiskFull(OSError):
    """A checkpoint or final model did not fit on its filesystem; what was there before is intact."""


# How a full disk reads once it has crossed an actor boundary; torch's C++ writer may
# only say "iostream error" or "unexpected pos", hence the free-space check as well.
_DISK_FULL = ("No space left on device", "file write failed", "Disk quota exceeded")
NEARLY_FULL_BYTES = 2 ** 20


def is_disk_full(error: BaseException, folder: Path) -> bool:
    """Did `error`, raised writing into `folder`, come from a full filesystem?"""
    seen: BaseException | None = error
    while seen is not None:
        if getattr(seen, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or any(m in str(seen) for m in _DISK_FULL):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return shutil.disk_usage(folder).free < NEARLY_FULL_BYTES
    except OSError:
        return False


def atomic_write_dir(target: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) fills a temporary folder; then COMPLETE is added and it is renamed to target.

    A failed write removes its temporary folder; on a full disk it raises DiskFull naming
    the path, the space left and what is still intact, so the run can go on with --resume
    once there is room.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        write(tmp)
        (tmp / COMPLETE).write_text(time.strftime("%Y-%m-%dT%H:%M:%S"))
        _fsync_dir(tmp)
    except BaseException as e:
        full = isinstance(e, Exception) and is_disk_full(e, target.parent)  # before its space comes back
        shutil.rmtree(tmp, ignore_errors=True)  # never loaded, and its space is what ran out
        if full:
            raise _disk_full(target) from e
        raise
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(target)


def _disk_full(target: Path) -> DiskFull:
    usage = shutil.disk_usage(target.parent)
    intact = [p for p in (target, *target.parent.glob("step_*")) if (p / COMPLETE).exists()]
    kept = (f"the previous {', '.join(str(p) for p in sorted(set(intact)))} intact" if intact
            else "nothing earlier was there to keep")
    return DiskFull(errno.ENOSPC, f"no space left on the device writing {target} "
                    f"({usage.free / 2**20:.1f} MiB free of {usage.total / 2**20:.1f} MiB); {kept}; "
                    "free some space, then run the same command again with --resume")


def _fsync_dir(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


class MetricsLogger:
    """Appends one JSON line per record and mirrors scalars to TensorBoard, and to
    Weights & Biases when `cfg.run.wandb` is offline or online."""

    def __init__(self, stage_dir: StageDir, tensorboard: bool = True, cfg=None):
        stage_dir.path.mkdir(parents=True, exist_ok=True)
        # Opened per record: `truncate_metrics` replaces the file, and a handle held open
        # would go on writing to the replaced one.
        self.path = stage_dir.metrics_file
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(str(stage_dir.tb_dir))
        self._wandb = wandb_run(stage_dir, cfg) if cfg is not None and cfg.run.wandb != "off" else None

    def log(self, step: int, **metrics) -> None:
        record = {"step": step, "time": time.time(), **metrics}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def wandb_run(stage_dir: StageDir, cfg):
    """One W&B run per stage, grouped by run directory, the config logged once at its start.

    Its id is fixed by the run directory and stage, so a resumed stage continues the
    same W&B run; files go under `<run>/wandb/`.
    """
    import hashlib

    import wandb

    run_dir = stage_dir.path.parent
    digest = hashlib.blake2b(str(run_dir.resolve()).encode(), digest_size=4).hexdigest()
    return wandb.init(project=cfg.run.wandb_project, mode=cfg.run.wandb, dir=str(run_dir),
                      group=run_dir.name, name=f"{run_dir.name}/{stage_dir.path.name}",
                      id=f"{run_dir.name}-{stage_dir.path.name}-{digest}", resume="allow",
                      config=cfg.dump_without_secrets(), reinit="create_new")


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(path: str | Path, before_step: int) -> int:
    """Keep only rows with step < before_step (the rest are about to be redone), atomically.

    Returns the rows kept. A crash mid-way leaves the old file whole, never a half-written one.
    """
    path = Path(path)
    rows = [r for r in read_metrics(path) if r["step"] < before_step]
    if path.exists():
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
    return len(rows)


def write_run_config(cfg: Config) -> Path:
    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    path = cfg.output_dir / "config.yaml"
    path.write_text(f"# resolved from {cfg.source}\n" + cfg.to_yaml())
    return path
