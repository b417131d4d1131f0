"""The Ray Train harness shared by stages 0-2.

A stage is a loop function `loop(ctx, **kwargs) -> dict` run on every worker of
a `TorchTrainer` (DDP: gloo on CPU, NCCL on GPU). `ctx` (`WorkerContext`) says
who the worker is and carries the few collectives a loop needs. Rank 0 alone
logs (JSONL + TensorBoard + a progress bar), writes checkpoints and the final
model, and writes the loop's summary to `<stage>/summary.json`, which the
driver returns: `ray.train.report` costs ~1 s a call and is not needed.

Data order is a pure function of (seed, epoch): every worker computes the same
global batch and takes its own contiguous shard, so a resumed run only has to
remember where it was. Losses are scaled by `global_share` (rlhf.masked, the
convention the PPO learners share) so that DDP's
gradient average equals the gradient of the global-batch mean, whatever the
shard sizes: N workers follow the same curve as one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
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

from rlhf import train_state
from rlhf.batch import split_evenly
from rlhf.config import Config
from rlhf.masked import global_share  # noqa: F401  (the stages call harness.global_share)
from rlhf.models import load_state_file
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

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def wrap(self, model: nn.Module) -> nn.Module:
        """Move to the device; DDP (gradients averaged over workers) when world > 1."""
        model = model.to(self.device)
        if self.world == 1:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
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

def optimizer_step(model: nn.Module, optimizer, scheduler, max_grad_norm: float | None) -> float:
    """Clip (if configured), step, advance the LR schedule, clear grads; returns the grad norm."""
    norm = nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm or float("inf"))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


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
    """The model on its device (DDP for world > 1), Adam with a cosine schedule to
    `final_lr_fraction`, the newest checkpoint restored and a progress bar.

    Returns (model, optimizer, scheduler, state, progress).
    """
    model = ctx.wrap(model)  # on the device before the optimizer (and a restored state) sees it
    optimizer = make_optimizer(model.parameters(), lr, ctx.cfg.optimizer)
    scheduler = lambda_lr(optimizer, cosine_to_fraction, total_steps=total_steps, final_fraction=final_lr_fraction)
    state = restore_latest(ctx, model, optimizer, scheduler)
    model.train()
    return model, optimizer, scheduler, state, Progress(ctx, total_steps, state.step, desc=desc)


def save_checkpoint(ctx: WorkerContext, state: TrainState, model: nn.Module, optimizer, scheduler) -> None:
    """Every worker's RNG state, and on rank 0 model, optimizer, schedule and position, atomically."""
    rngs = ctx.gather(train_state.rng_state())
    if ctx.is_main:
        blob = {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "state": dataclasses.asdict(state), "rng": rngs}
        ctx.stage.save_checkpoint(state.step, lambda d: torch.save(blob, d / "state.pt"))
    ctx.barrier()


def restore_latest(ctx: WorkerContext, model: nn.Module, optimizer, scheduler) -> TrainState:
    """Load the stage's newest complete checkpoint if any, and cut metrics logged after it."""
    path = ctx.stage.latest_checkpoint()
    state = TrainState()
    if path is not None:
        # CPU first: RNG states must stay CPU tensors; load_state_dict moves the rest.
        blob = load_state_file(path / "state.pt")
        unwrap(model).load_state_dict(blob["model"])
        optimizer.load_state_dict(blob["optimizer"])
        scheduler.load_state_dict(blob["scheduler"])
        train_state.set_rng_state(blob["rng"][ctx.rank % len(blob["rng"])])
        state = TrainState(**blob["state"])
    if ctx.is_main:  # rows after the checkpoint (or all, without one) are about to be redone
        truncate_metrics(ctx.stage.metrics_file, state.step + 1 if path is not None else 0)
    ctx.barrier()
    return state


def save_hf(ctx: WorkerContext, target: Path, model, tokenizer) -> None:
    """Rank 0 writes an HF directory (model + tokenizer) atomically; everyone waits."""
    if ctx.is_main:
        atomic_write_dir(target, lambda d: (unwrap(model).save_pretrained(d), tokenizer.save_pretrained(d)))
    ctx.barrier()


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
    """sha256 of every parameter's bytes: equal across DDP workers when they are in sync."""
    h = hashlib.sha256()
    for name, p in sorted(unwrap(model).named_parameters()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
