"""Running a stage of 0-2 on Ray Train workers (or locally), and its data order.

A stage is a loop function `loop(ctx, **kwargs) -> dict` run on every worker of
a `TorchTrainer` (gloo on CPU, NCCL on GPU). `ctx` (`WorkerContext`) says
who the worker is and carries the few collectives a loop needs. Rank 0 alone
logs (JSONL + TensorBoard + a progress bar), writes the final model and the
loop's summary to `<stage>/summary.json`, which the driver returns:
`ray.train.report` costs ~1 s a call and is not needed. The loop's training
mechanics are `training`'s; its checkpoints and HF export `checkpointing`'s.

How a worker holds its model is `rlhf.sharding`'s (`resources.strategy`,
`model.dtype`, `resources.activation_checkpointing`), applied by
`WorkerContext.wrap`: under "ddp" a full replica (DistributedDataParallel for
world > 1); under "fsdp" each worker holds a shard.

Data order is a pure function of (seed, epoch): every worker computes the same
global batch and takes its own contiguous shard, so a resumed run only has to
remember where it was. Losses are scaled by `global_share` (rlhf.masked, the
convention the PPO learners share) so that DDP's
gradient average equals the gradient of the global-batch mean, whatever the
shard sizes: N workers follow the same curve as one.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from rlhf import sharding
from rlhf.batch import split_evenly
from rlhf.config import Config
from rlhf.seeds import derive_seed
from orchestration.rundir import StageDir

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


# ---------------------------------------------------------------- running a stage

Loop = Callable[..., dict]
HEALTH_CHECK_INTERVAL_S = 0.25  # Ray Train's default is 2


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
    # Ray Train's controller polls its workers every 2 s and takes two polls to see a loop's
    # end: 2.0-2.8 s of every stage; at 0.25 s, 0.2-1.1 s. fit() hands this to the controller.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(HEALTH_CHECK_INTERVAL_S))
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
