"""A stage's training mechanics on one worker: micro-batch accumulation, the optimizer step, progress.

`start_training` wires a worker's model into a `Trainer` (optimizer, cosine LR
schedule, fp16 loss scaler) resumed from the stage's newest checkpoint. A
16-bit `model.dtype` computes forwards in it over float32 master weights (fp16
with a loss scaler). A worker's share of a batch runs as micro-batches of
`<stage>.micro_batch_size` (`Trainer.accumulate`), each loss weighted by its own
share of the global batch, so the summed gradient is the whole share's.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import time
from typing import Any, Callable, Sequence

import torch
from torch import nn
from tqdm import tqdm

from rlhf import sharding
from rlhf.batch import split_evenly
from rlhf.schedules import cosine_to_fraction, lambda_lr
from rlhf.train_state import make_optimizer
from orchestration.rundir import MetricsLogger
from orchestration.stages.checkpointing import restore_latest
from orchestration.stages.harness import WorkerContext, unwrap


def micro_batches(items: Sequence, micro_batch_size: int | None, most: int | None = None) -> list[list]:
    """A worker's share of a batch as consecutive micro-batches of at most `micro_batch_size`.

    None is the whole share in one. Every worker must run the same number (DDP's last
    backward syncs, FSDP's forwards are collectives): `most` is the largest share any
    worker holds (default: this one's). A worker with fewer items than micro-batches
    gets some empty ones (`Trainer.accumulate` runs them as zero-weight forwards).
    """
    if micro_batch_size is None:
        return [list(items)]
    n = -(-(len(items) if most is None else most) // micro_batch_size)
    return split_evenly(items, max(n, 1))


@dataclasses.dataclass
class Trainer:
    """The model as this worker trains it, its optimizer, LR schedule and (fp16) loss scaler."""
    ctx: WorkerContext
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: sharding.LossScaler

    @property
    def sharded(self) -> bool:
        return sharding.is_sharded(self.model)

    def accumulate(self, parts: Sequence, loss_fn: Callable[[Any], tuple[torch.Tensor, Any]],
                   size: Callable[[Any], int] = len, filler: Any = None) -> list:
        """Forward and backward each micro-batch; gradients sum over them. Returns the parts' stats.

        `loss_fn(part) -> (loss, stats)` runs under the compute context; the loss must
        already be weighted by the part's share of the global batch. DDP syncs on the
        last backward only (`no_sync` before); FSDP2 reduce-scatters after each one into
        its sharded gradients (a no-sync there would keep full-size gradients). A part
        of `size` 0 (`micro_batches`: a worker with fewer items than micro-batches) runs
        the first non-empty part again with its loss times 0, so that the workers'
        collectives stay in step; its stats are dropped. A worker with no items at all
        (more workers than a batch has examples) runs `filler` so.
        """
        ddp = isinstance(self.model, nn.parallel.DistributedDataParallel)
        filler = next((p for p in parts if size(p)), filler)
        out = []
        for i, part in enumerate(parts):
            last, empty = i == len(parts) - 1, not size(part)
            with self.model.no_sync() if ddp and not last else contextlib.nullcontext():
                with self.ctx.compute():
                    loss, stats = loss_fn(filler if empty else part)
                if empty:
                    loss = loss * 0.0
                self.scaler.scaled(loss).backward()
            if not empty:
                out.append(stats)
        return out

    def step(self, max_grad_norm: float | None) -> float:
        return optimizer_step(self.model, self.optimizer, self.scheduler, max_grad_norm, self.scaler)

    def state_dict_extra(self) -> dict:
        """What a checkpoint holds beyond today's (ddp, float32) contents: the fp16 loss scale."""
        return {"scaler": self.scaler.state_dict()} if self.scaler.enabled else {}

    def metrics(self) -> dict:
        """Extra per-step metrics: the fp16 loss scale (nothing otherwise)."""
        return {"loss_scale": self.scaler.scale} if self.scaler.enabled else {}


def optimizer_step(model: nn.Module, optimizer, scheduler, max_grad_norm: float | None,
                   scaler: sharding.LossScaler | None = None) -> float:
    """Clip (if configured), step, advance the LR schedule, clear grads; returns the grad norm.

    With an enabled (fp16) loss scaler the gradients are unscaled first, and a step
    whose gradients overflowed is skipped (the schedule still advances) and the scale
    lowered. Under FSDP the norm is a DTensor over all shards: its full value is taken.
    """
    if scaler is not None and scaler.enabled:
        for p in model.parameters():
            if p.grad is not None:
                p.grad.div_(scaler.scale)
    norm = float(sharding.full(nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm or float("inf"))))
    finite = math.isfinite(norm)
    if finite or scaler is None or not scaler.enabled:
        optimizer.step()
    if scaler is not None:
        scaler.update(finite)
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def start_training(ctx: WorkerContext, model: nn.Module, lr: float, total_steps: int,
                   final_lr_fraction: float, desc: str):
    """The model as this worker trains it (`WorkerContext.wrap`), Adam with a cosine schedule
    to `final_lr_fraction`, the newest checkpoint restored and a progress bar.

    Returns (trainer, state, progress).
    """
    model = ctx.wrap(model)  # on the device (and sharded) before the optimizer (and a restored state) sees it
    optimizer = make_optimizer(model.parameters(), lr, ctx.cfg.optimizer)
    scheduler = lambda_lr(optimizer, cosine_to_fraction, total_steps=total_steps, final_fraction=final_lr_fraction)
    trainer = Trainer(ctx, model, optimizer, scheduler,
                      sharding.LossScaler.for_dtype(ctx.layout.compute))
    state = restore_latest(ctx, trainer)
    model.train()
    return trainer, state, Progress(ctx, total_steps, state.step, desc=desc)


class Progress:
    """Rank 0's view of training: a tqdm bar (loss, tokens/s) and the metrics log."""

    def __init__(self, ctx: WorkerContext, total_steps: int, start_step: int, desc: str):
        self.main = ctx.is_main
        self.logger = MetricsLogger(ctx.stage, cfg=ctx.cfg) if self.main else None
        self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, mininterval=2.0,
                        dynamic_ncols=True, disable=not self.main)
        self._t = time.perf_counter()

    def step(self, step: int, tokens: float, **metrics: float) -> None:
        now = time.perf_counter()
        tps, self._t = tokens / max(now - self._t, 1e-9), now
        self.log(step, tokens_per_s=tps, **metrics)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4f}", tok_s=f"{tps:.0f}", refresh=False)

    def log(self, step: int, **metrics: float) -> None:
        if self.main:
            self.logger.log(step, **metrics)

    def close(self) -> None:
        self.bar.close()
        if self.main:
            self.logger.close()


def weights_checksum(model: nn.Module) -> str:
    """sha256 of every parameter's (whole) bytes: equal across DDP workers when they are in sync.

    Collective for a sharded model (every worker calls it; each gets the full weights' sum).
    """
    h = hashlib.sha256()
    for name, p in sorted(unwrap(model).named_parameters(), key=lambda item: item[0]):
        h.update(name.encode())
        h.update(sharding.full(p.detach()).cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
