"""What the policy and critic learners share: start-up, the optimizer and LR schedule,
batched no-grad forwards, step stats and checkpoint state.

Both train with Adam on a warmup-then-constant schedule over PPO iterations, one
step per minibatch (`DistributedWorker.synced_step`). How a rank holds its model
is the `TrainLayout` (rlhf/sharding.py): a full float32 replica with gradients
all-reduced in flat buckets ("ddp"), or an FSDP2 shard ("fsdp"), computing in
`model.dtype`. A sharded learner can only shard once its group exists, so it
starts training at the end of `setup_distributed`; a replica starts at once
(and also works outside a group, as in tests and benches).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import torch

from actors.group import BucketedGrads, DistributedWorker
from actors.resources import configure_threads, pick_device
from actors.weight_sync import module_checksum
from rlhf import dist_checkpoint, sharding
from rlhf.config import OptimizerConfig, PPOConfig
from rlhf.models import load_state_file
from rlhf.schedules import lambda_lr, warmup_then_constant
from rlhf.sharding import LossScaler, TrainLayout
from rlhf.train_state import make_optimizer, restore, rng_state, set_rng_state, snapshot


class Learner(DistributedWorker):
    model: torch.nn.Module
    lr: float

    def __init__(self, ppo: PPOConfig | None, optimizer: OptimizerConfig | None, seed: int,
                 num_threads: int | None, device: str, layout: TrainLayout | None, bucket_cap_mb: float,
                 forward_batch_size: int) -> None:
        configure_threads(num_threads)
        torch.manual_seed(seed)
        self.device = pick_device(device)
        self.layout = layout or TrainLayout()
        self.ppo = ppo or PPOConfig()
        self.opt_cfg = optimizer or OptimizerConfig()
        self.cap_bytes = int(bucket_cap_mb * 2**20)
        self.forward_batch_size = forward_batch_size
        self.scaler = LossScaler.for_dtype(self.layout.compute)
        self.optimizer = None

    # ---- start-up -------------------------------------------------------------------
    def begin(self) -> None:
        """Subclasses call this at the end of __init__, once `self.model` is loaded."""
        if not self.layout.sharded:
            self._start()

    def setup_distributed(self, rank: int, world_size: int, endpoint: tuple[str, int],
                          timeout_s: float = 300.0) -> str:
        backend = super().setup_distributed(rank, world_size, endpoint, timeout_s)
        if self.layout.sharded:
            self._start()  # every rank holds rank 0's weights now; shard them
        return backend

    def _start(self) -> None:
        self.model = sharding.prepare(self.model, self.layout, self.device, self.world_size)
        self.before_optimizer()
        self.optimizer = make_optimizer(self.model.parameters(), self.lr, self.opt_cfg)
        self.scheduler = lambda_lr(self.optimizer, warmup_then_constant,
                                   warmup_iters=self.ppo.warmup_iterations,
                                   start_fraction=self.ppo.warmup_start_fraction)
        self.grads = BucketedGrads(
            [(n, p) for n, p in self.model.named_parameters() if p.requires_grad], self.cap_bytes)
        self.after_optimizer()

    def before_optimizer(self) -> None:
        """Hook: the model is prepared, the optimizer not yet built."""

    def after_optimizer(self) -> None:
        """Hook: training state complete."""

    def _require_started(self) -> None:
        if self.optimizer is None:
            raise RuntimeError("a sharded (fsdp) learner trains inside its group: "
                               "start it through WorkerGroup (setup_distributed)")

    def trained_module(self) -> torch.nn.Module:
        return self.model

    @property
    def lockstep(self) -> bool:
        return self.layout.sharded and self.world_size > 1

    # ---- forwards -------------------------------------------------------------------
    def compute(self):
        """The context every forward runs in (autocast for 16-bit DDP)."""
        return sharding.compute_context(self.layout, self.device)

    @torch.no_grad()
    def forward_in_batches(self, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                           input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """fn(ids, mask) over `forward_batch_size` rows at a time, on the CPU.

        Sharded, a forward is a collective: every rank runs as many as the rank with the
        most rows, the extra ones on a throwaway row.
        """
        self._require_started()
        n = self.forward_batch_size
        chunks = list(zip(input_ids.split(n), attention_mask.split(n)))
        extra = self.most(len(chunks)) - len(chunks)
        with self.compute():
            out = [fn(i.to(self.device), m.to(self.device)).cpu() for i, m in chunks]
            for _ in range(extra):
                fn(*self.throwaway_row())
        return torch.cat(out) if out else torch.zeros(input_ids.shape, dtype=torch.float32)

    def micro_batches(self, rows: int, per_piece: int | None = None) -> int:
        """How many forward/backward passes a shard of `rows` rows takes at `per_piece` rows
        each (default `ppo.micro_batch_size`, None there: one). Sharded, every rank runs the
        busiest rank's count (its forwards are collectives); its extra pieces are empty."""
        mb = per_piece or self.ppo.micro_batch_size
        return self.most(max(1, math.ceil(rows / mb)) if mb else 1)

    def idle_pass(self, forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], backward: bool) -> None:
        """A piece with no rows: sharded, the rank still runs a forward (and a backward that
        adds 0 to its gradients) on a throwaway row, so the group's collectives stay in step."""
        if not self.lockstep:
            return
        with torch.set_grad_enabled(backward), self.compute():
            out = forward(*self.throwaway_row())
        if backward:
            self.backward(out.sum() * 0.0)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scaled(loss).backward()

    def step_stats(self, grad_norm: float, skipped: bool) -> dict[str, float]:
        stats = {"grad_norm": grad_norm, "lr": self.scheduler.get_last_lr()[0], "skipped": float(skipped),
                 "nonfinite_steps": float(self.nonfinite_steps)}
        if self.scaler.enabled:
            stats["loss_scale"] = self.scaler.scale
        return stats

    # ---- weights out ----------------------------------------------------------------
    def checksum(self) -> str:
        """Of this rank's whole weights (its replica; gathered, a collective, when sharded)."""
        return module_checksum(self.model)

    def full_parameters(self) -> dict[str, torch.Tensor]:
        """Whole CPU copies of the weights (gathered, a collective, when sharded)."""
        return {n: t.cpu().clone() for n, t in sharding.full_named_tensors(self.model.named_parameters())}

    def local_numel(self) -> int:
        """Parameter elements this rank holds (all of them for a replica, its shards under fsdp)."""
        return sum(sharding.local(p).numel() for p in self.model.parameters())

    # ---- checkpoints ----------------------------------------------------------------
    def snapshot(self, **extra: Any) -> dict[str, Any]:
        return snapshot(self.model, self.optimizer, self.scheduler, nonfinite_steps=self.nonfinite_steps,
                        loss_scaler=self.scaler.state_dict(), **extra)

    def restore(self, state: dict[str, Any]) -> dict[str, Any]:
        extra = restore(state, self.model, self.optimizer, self.scheduler)
        self.nonfinite_steps = int(extra["nonfinite_steps"])
        if "loss_scaler" in extra:
            self.scaler.load_state_dict(extra["loss_scaler"])
        return extra

    def sharded_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """Sharded state besides the model and Adam (the policy's EMA)."""
        return {}

    def state_dict_for_checkpoint(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def save_checkpoint(self, directory: str, name: str) -> None:
        """Into a checkpoint folder: `<name>.pt` from rank 0 of a replica group, or the
        sharded `<name>/` that every rank of an fsdp group writes its part of."""
        self._require_started()
        if self.layout.sharded:
            plain = self.plain_state()
            dist_checkpoint.save(Path(directory) / name, self.model, self.optimizer,
                                 self.sharded_tensors(), plain)
        elif self.rank == 0:
            torch.save(self.state_dict_for_checkpoint(), Path(directory) / f"{name}.pt")

    def load_checkpoint(self, directory: str, name: str) -> None:
        self._require_started()
        if self.layout.sharded:
            self.load_plain_state(dist_checkpoint.load(Path(directory) / name, self.model, self.optimizer,
                                                       self.sharded_tensors()))
        else:
            self.load_checkpoint_state(load_state_file(Path(directory) / f"{name}.pt"))

    def plain_state(self) -> dict[str, Any]:
        """A sharded rank's own non-tensor state (schedule, RNG, counters)."""
        return {"scheduler": self.scheduler.state_dict(), "rng": rng_state(),
                "nonfinite_steps": self.nonfinite_steps, "loss_scaler": self.scaler.state_dict()}

    def load_plain_state(self, state: dict[str, Any]) -> dict[str, Any]:
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        self.nonfinite_steps = int(state["nonfinite_steps"])
        self.scaler.load_state_dict(state["loss_scaler"])
        return state
