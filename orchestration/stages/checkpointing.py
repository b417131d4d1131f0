"""A stage's checkpoints (save, resume) and its final HF directory.

Under "ddp" rank 0 writes a checkpoint alone (`state.pt`); under "fsdp" every
worker writes its part (`rlhf.dist_checkpoint`) into the one atomic folder, and
the final HF directory is gathered from the shards into an unsharded copy.
`TrainState` is the position a checkpoint records, so a resumed run goes on
from the batch it stopped at.
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from rlhf import dist_checkpoint, sharding, train_state
from rlhf.models import ScalarModel, load_state_file
from orchestration.rundir import atomic_write_dir, truncate_metrics
from orchestration.stages.harness import WorkerContext, unwrap

if TYPE_CHECKING:  # training imports this module (start_training restores from it)
    from orchestration.stages.training import Trainer


@dataclasses.dataclass
class TrainState:
    step: int = 0            # optimizer steps done
    epoch: int = 0           # epoch in progress
    batch_in_epoch: int = 0  # batches of `epoch` already consumed
    extra: dict = dataclasses.field(default_factory=dict)  # e.g. the untrained model's loss

    def next_step(self) -> None:
        self.step += 1
        self.batch_in_epoch += 1

    def next_epoch(self) -> None:
        self.epoch += 1
        self.batch_in_epoch = 0


def save_checkpoint(ctx: WorkerContext, state: TrainState, trainer: Trainer) -> None:
    """Model, optimizer, schedule, position and every worker's RNG state, atomically.

    Unsharded: rank 0 writes it all (`state.pt`). Sharded: rank 0 opens the atomic
    folder, every worker writes its shards and its own plain state into it
    (`rlhf.dist_checkpoint`), and rank 0 completes it once all have.
    """
    if trainer.sharded:
        return _save_sharded(ctx, state, trainer)
    rngs = ctx.gather(train_state.rng_state())
    if ctx.is_main:
        blob = {"model": unwrap(trainer.model).state_dict(), "optimizer": trainer.optimizer.state_dict(),
                "scheduler": trainer.scheduler.state_dict(), "state": dataclasses.asdict(state), "rng": rngs,
                **trainer.state_dict_extra()}
        ctx.stage.save_checkpoint(state.step, lambda d: torch.save(blob, d / "state.pt"))
    ctx.barrier()


def _save_sharded(ctx: WorkerContext, state: TrainState, trainer: Trainer) -> None:
    plain = {"scheduler": trainer.scheduler.state_dict(), "state": dataclasses.asdict(state),
             "rng": train_state.rng_state(), **trainer.state_dict_extra()}

    def write(folder: Path | None) -> None:  # every worker; rank 0 inside the atomic write
        folder = Path(ctx.broadcast(str(folder) if folder is not None else None))
        dist_checkpoint.save(folder, trainer.model, trainer.optimizer, {}, plain)
        ctx.barrier()  # all shards are written before rank 0 marks the folder complete

    if ctx.is_main:
        ctx.stage.save_checkpoint(state.step, write)
    else:
        write(None)
    ctx.barrier()


def restore_latest(ctx: WorkerContext, trainer: Trainer) -> TrainState:
    """Load the stage's newest complete checkpoint if any, and cut metrics logged after it."""
    path = ctx.stage.latest_checkpoint()
    state = TrainState()
    if path is not None:
        if dist_checkpoint.is_sharded_checkpoint(path) != trainer.sharded:
            written, now = ("fsdp", "ddp") if not trainer.sharded else ("ddp", "fsdp")
            raise ValueError(f"{path}: written by a {written} run, and resources.strategy is now {now}; "
                             "resume with the strategy it was written with")
        if trainer.sharded:
            blob = dist_checkpoint.load(path, trainer.model, trainer.optimizer, {})
            rng = blob["rng"]
        else:
            # CPU first: RNG states must stay CPU tensors; load_state_dict moves the rest.
            blob = load_state_file(path / "state.pt")
            unwrap(trainer.model).load_state_dict(blob["model"])
            trainer.optimizer.load_state_dict(blob["optimizer"])
            rng = blob["rng"][ctx.rank % len(blob["rng"])]
        trainer.scheduler.load_state_dict(blob["scheduler"])
        if trainer.scaler.enabled and "scaler" in blob:
            trainer.scaler.load_state_dict(blob["scaler"])
        train_state.set_rng_state(rng)
        state = TrainState(**blob["state"])
    if ctx.is_main:  # rows after the checkpoint (or all, without one) are about to be redone
        truncate_metrics(ctx.stage.metrics_file, state.step + 1 if path is not None else 0)
    ctx.barrier()
    return state


def save_hf(ctx: WorkerContext, target: Path, model, tokenizer) -> None:
    """Rank 0 writes an HF directory (model + tokenizer) atomically; everyone waits.

    A sharded model is gathered first (every worker takes part) into an unsharded copy.
    """
    model = unwrap(model)
    if sharding.is_sharded(model):
        state = sharding.full_state_dict(model)  # collective
        model = unsharded_copy(model, state) if ctx.is_main else None
        del state
    if ctx.is_main:
        atomic_write_dir(target, lambda d: (model.save_pretrained(d), tokenizer.save_pretrained(d)))
    ctx.barrier()


def _plain_class(module: nn.Module) -> type:
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))


def _meta_twin(module: nn.Module) -> nn.Module:
    """The same (unsharded) model class and config with weights on the meta device."""
    from transformers import PreTrainedModel

    if isinstance(module, ScalarModel):
        return ScalarModel(_meta_twin(module.model))
    if not isinstance(module, PreTrainedModel):
        raise TypeError(f"cannot save a sharded {type(module).__name__}: not an HF model or ScalarModel")
    with torch.device("meta"), torch.random.fork_rng(devices=[]):
        return _plain_class(module)(copy.deepcopy(module.config))


def unsharded_copy(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A plain module of `model`'s class and config holding `state` (a full state dict, CPU)."""
    twin = _meta_twin(model)
    twin.load_state_dict(state, strict=True, assign=True)
    # Assigning gave tied weights (GPT-2's unembedding) separate copies: tie them again.
    (twin.model if isinstance(twin, ScalarModel) else twin).tie_weights()
    live = dict(model.named_buffers())  # non-persistent buffers are not in the state dict
    for name, buf in list(twin.named_buffers()):
        if buf.is_meta:
            owner, _, attr = name.rpartition(".")
            twin.get_submodule(owner)._buffers[attr] = live[name].detach().to("cpu", copy=True)
    meta = [n for n, p in twin.named_parameters() if p.is_meta]
    if meta:
        raise RuntimeError(f"unsharded copy lacks weights {meta}")
    return twin
