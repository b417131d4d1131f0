"""The Ray Train harness shared by stages 0-2.

A stage is a loop function `loop(ctx, **kwargs) -> dict` run on every worker of
a `TorchTrainer` (gloo on CPU, NCCL on GPU). `ctx` (`WorkerContext`) says
who the worker is and carries the few collectives a loop needs. Rank 0 alone
logs (JSONL + TensorBoard + a progress bar), writes the final model and the
loop's summary to `<stage>/summary.json`, which the driver returns:
`ray.train.report` costs ~1 s a call and is not needed.

How a worker holds its model is `rlhf.sharding`'s (`resources.strategy`,
`model.dtype`, `resources.activation_checkpointing`): under "ddp" a full replica
(DistributedDataParallel for world > 1) and rank 0 writes checkpoints alone;
under "fsdp" each worker holds a shard, every worker writes its part of a
checkpoint (`rlhf.dist_checkpoint`) into the one atomic folder, and the final HF
directory is gathered from the shards. A 16-bit `model.dtype` computes forwards
in it over float32 master weights (fp16 with a loss scaler). A worker's share of
a batch runs as micro-batches of `<stage>.micro_batch_size` (`Trainer.accumulate`),
each loss weighted by its own share of the global batch, so the summed gradient
is the whole share's.

Data order is a pure function of (seed, epoch): every worker computes the same
global batch and takes its own contiguous shard, so a resumed run only has to
remember where it was. Losses are scaled by `global_share` (rlhf.masked, the
convention the PPO learners share) so that DDP's
gradient average equals the gradient of the global-batch mean, whatever the
shard sizes: N workers follow the same curve as one.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from rlhf import dist_checkpoint, sharding, train_state
from rlhf.batch import split_evenly
from rlhf.config import Config
from rlhf.masked import global_share  # noqa: F401  (the stages call harness.global_share)
from rlhf.models import ScalarModel, load_state_file
from rlhf.schedules import cosine_to_fraction, lambda_lr
from rlhf.seeds import derive_seed
from rlhf.train_state import make_optimizer
from orchestration.rundir import MetricsLogger, StageDir, atomic_write_dir, truncate_metrics

DEFAULT_CHECKPOINT_EVERY = 100  # optimizer steps; stages 0-2 have no config field for it yet
SUMMARY = "summary.json"


@dataclasses.dataclass
class WorkerContext:
    cfg: Config
    stage: StageDir
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence) -> list:
        """This worker's contiguous, nearly equal part of a global batch."""
        return split_evenly(items, self.world)[self.rank]

    def all_sum(self, values: Sequence[float]) -> list[float]:
        if self.world == 1:
            return [float(v) for v in values]
        t = torch.tensor(values, dtype=torch.float64, device=self.device)  # NCCL wants device tensors
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, obj: Any) -> list:
        if self.world == 1:
            return [obj]
        out: list = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any = None) -> Any:
        """Rank 0's `obj` on every worker."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    @property
    def layout(self) -> sharding.TrainLayout:
        """The config's strategy, dtype and activation checkpointing for this worker.

        A single worker outside a process group (`run_local`) has nothing to shard
        across: "fsdp" trains it as one unsharded replica (same dtype).
        """
        layout = sharding.TrainLayout.of(self.cfg)
        if layout.sharded and not dist.is_initialized():
            layout = dataclasses.replace(layout, strategy="ddp")
        return layout

    def compute(self):
        """The context forwards run in (autocast for 16-bit DDP; nothing otherwise)."""
        return sharding.compute_context(self.layout, self.device)

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model as this worker trains it (`sharding.prepare`): FSDP2-sharded under
        "fsdp"; under "ddp" on the device, in DistributedDataParallel when world > 1."""
        layout = self.layout
        model = sharding.prepare(model, layout, self.device, self.world)
        if layout.sharded or self.world == 1:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def forward_chunks(self, items: Sequence, size: int) -> list[tuple[list, bool]]:
        """This worker's shard of `items` in chunks of `size` for no-grad forwards (evaluation).

        Each chunk comes with True. Under a sharded model a forward is a collective, so
        every worker runs as many as the busiest one: the extra chunks repeat the first
        of `items` and come with False, their results to be dropped.
        """
        mine = self.shard(items)
        chunks = [(list(mine[i:i + size]), True) for i in range(0, len(mine), size)]
        if self.layout.sharded and self.world > 1 and len(items):
            most = max(-(-len(s) // size) for s in split_evenly(items, self.world))
            chunks += [(list(items[:size]), False)] * (most - len(chunks))
        return chunks


def unwrap(model: nn.Module) -> nn.Module:
    """The module itself: DDP's inner one; a sharded (FSDP) model is its own."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ---------------------------------------------------------------- data order

def epoch_batches(n_items: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The epoch's global batches: a permutation seeded by (seed, epoch), last partial batch dropped."""
    if n_items < batch_size:
        raise ValueError(f"{n_items} examples is less than one batch of {batch_size}")
    gen = torch.Generator().manual_seed(derive_seed(seed, epoch))
    perm = torch.randperm(n_items, generator=gen).tolist()
    return [perm[i:i + batch_size] for i in range(0, n_items - batch_size + 1, batch_size)]


def stream_batch(n_items: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Batch `step` of an endless stream of epochs (pretraining text, the ptx mix)."""
    per_epoch = n_items // batch_size
    return epoch_batches(n_items, batch_size, seed, step // max(per_epoch, 1))[step % max(per_epoch, 1)]


def seed_worker(seed: int, rank: int) -> None:
    """Distinct dropout streams per worker, reproducible per (seed, rank)."""
    s = derive_seed(seed, "worker", rank) % 2**31
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


# ---------------------------------------------------------------- optimisation

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
                   size: Callable[[Any], int] = len) -> list:
        """Forward and backward each micro-batch; gradients sum over them. Returns the parts' stats.

        `loss_fn(part) -> (loss, stats)` runs under the compute context; the loss must
        already be weighted by the part's share of the global batch. DDP syncs on the
        last backward only (`no_sync` before); FSDP2 reduce-scatters after each one into
        its sharded gradients (a no-sync there would keep full-size gradients). A part
        of `size` 0 (`micro_batches`: a worker with fewer items than micro-batches) runs
        the first non-empty part again with its loss times 0, so that the workers'
        collectives stay in step; its stats are dropped.
        """
        ddp = isinstance(self.model, nn.parallel.DistributedDataParallel)
        filler = next((p for p in parts if size(p)), None)
        out = []
        for i, part in enumerate(parts):
            last, empty = i == len(parts) - 1, not size(part)
            with self.model.no_sync() if ddp and not last else contextlib.nullcontext():
                with self.ctx.compute():
                    loss, stats = loss_fn(filler if empty else part)
                if empty:
                    loss = loss * 0.0
                (loss * self.scaler.scale if self.scaler.enabled else loss).backward()
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


# ---------------------------------------------------------------- state and checkpoints

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
                      sharding.LossScaler(ctx.layout.compute == torch.float16))
    state = restore_latest(ctx, trainer)
    model.train()
    return trainer, state, Progress(ctx, total_steps, state.step, desc=desc)


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


# ---------------------------------------------------------------- progress and metrics

class Progress:
    """Rank 0's view of training: a tqdm bar (loss, tokens/s) and the metrics log."""

    def __init__(self, ctx: WorkerContext, total_steps: int, start_step: int, desc: str):
        self.main = ctx.is_main
        self.logger = MetricsLogger(ctx.stage) if self.main else None
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


# ---------------------------------------------------------------- running a stage

Loop = Callable[..., dict]


def prepare_stage_dir(stage: StageDir, resume: bool) -> None:
    """A fresh (non-resumed) stage starts from an empty directory."""
    if not resume and stage.path.exists():
        shutil.rmtree(stage.path)
    stage.path.mkdir(parents=True, exist_ok=True)


def use_gpu(cfg: Config) -> bool:
    return cfg.run.device == "cuda" or (cfg.run.device == "auto" and cfg.resources.num_gpus > 0)


def run_stage(cfg: Config, stage_name: str, loop: Loop, num_workers: int,
              checkpoint_every: int | None = None, **kwargs) -> dict:
    """Run `loop` on `num_workers` Ray Train workers; returns its summary (rank 0's return value).

    The stage directory must be prepared (`prepare_stage_dir`) by the caller.
    """
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if not ray.is_initialized():
        ray.init(num_cpus=int(cfg.resources.num_cpus) if cfg.resources.num_cpus else None)
    gpu = use_gpu(cfg)
    cpus = cfg.resources.num_cpus or ray.cluster_resources().get("CPU", 1.0)
    per_worker = max(cpus / num_workers, 1.0) if not gpu else 1.0
    stage = StageDir(cfg.output_dir, stage_name)
    config = {"cfg": cfg, "stage": stage_name, "loop": loop, "kwargs": kwargs, "threads": int(per_worker),
              "checkpoint_every": checkpoint_every or DEFAULT_CHECKPOINT_EVERY}
    trainer = TorchTrainer(
        _worker_main, train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=gpu,
                                     resources_per_worker={"CPU": per_worker}),
        run_config=RunConfig(name=stage_name, storage_path=str((stage.path / "ray").resolve()),
                             failure_config=FailureConfig(max_failures=0)))
    trainer.fit()
    return json.loads((stage.path / SUMMARY).read_text())


def run_local(cfg: Config, stage_name: str, loop: Loop, checkpoint_every: int | None = None,
              **kwargs) -> dict:
    """The same loop in this process as a single worker (tests, debugging)."""
    ctx = WorkerContext(cfg, StageDir(cfg.output_dir, stage_name),
                        checkpoint_every=checkpoint_every or DEFAULT_CHECKPOINT_EVERY)
    return _run(ctx, loop, kwargs)


def run_processes(cfg: Config, stage_name: str, loop: Loop, world: int, checkpoint_every: int | None = None,
                  threads: int = 1, **kwargs) -> dict:
    """The same loop on `world` local processes in one gloo group, without Ray (tests, debugging).

    Returns rank 0's summary. `loop` and `kwargs` must pickle (a module-level function).
    """
    import socket

    import torch.multiprocessing as mp

    StageDir(cfg.output_dir, stage_name).path.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_process_main, args=(world, port, threads, cfg, stage_name, loop,
                                  checkpoint_every or DEFAULT_CHECKPOINT_EVERY, kwargs), nprocs=world)
    return json.loads((StageDir(cfg.output_dir, stage_name).path / SUMMARY).read_text())


def _process_main(rank: int, world: int, port: int, threads: int, cfg: Config, stage_name: str, loop: Loop,
                  checkpoint_every: int, kwargs: dict) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        ctx = WorkerContext(cfg, StageDir(cfg.output_dir, stage_name), rank=rank, world=world,
                            checkpoint_every=checkpoint_every)
        _run(ctx, loop, kwargs)
    finally:
        dist.destroy_process_group()


def _worker_main(config: dict) -> None:
    import datasets
    import ray.train
    import ray.train.torch
    import transformers

    torch.set_num_threads(config["threads"])
    datasets.disable_progress_bars()  # one bar per worker log line is noise; ours is the stage's
    transformers.utils.logging.disable_progress_bar()
    info = ray.train.get_context()
    cfg: Config = config["cfg"]
    ctx = WorkerContext(cfg, StageDir(cfg.output_dir, config["stage"]), rank=info.get_world_rank(),
                        world=info.get_world_size(), device=ray.train.torch.get_device(),
                        checkpoint_every=config["checkpoint_every"])
    _run(ctx, config["loop"], config["kwargs"])


def _run(ctx: WorkerContext, loop: Loop, kwargs: dict) -> dict:
    seed_worker(ctx.cfg.run.seed, ctx.rank)
    summary = loop(ctx, **kwargs)
    if ctx.is_main:
        tmp = ctx.stage.path / f".{SUMMARY}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(summary, indent=1))
        tmp.replace(ctx.stage.path / SUMMARY)
    ctx.barrier()
    return summary


def weights_checksum(model: nn.Module) -> str:
    """sha256 of every parameter's (whole) bytes: equal across DDP workers when they are in sync.

    Collective for a sharded model (every worker calls it; each gets the full weights' sum).
    """
    h = hashlib.sha256()
    for name, p in sorted(unwrap(model).named_parameters(), key=lambda item: item[0]):
        h.update(name.encode())
        h.update(sharding.full(p.detach()).cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
