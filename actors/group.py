"""Worker groups: N actors of one class in one torch.distributed group.

Driver side, `WorkerGroup` creates the actors, rendezvouses them on a free TCP
port of rank 0's node (gloo on CPU, NCCL on GPU) and calls methods on every
rank, with the same or per-rank arguments, returning the futures.

Worker side, `DistributedWorker` is the mixin the learners inherit: joining the
group, starting every rank from rank 0's weights, and one optimizer step from
gradients all-reduced in a few flat buckets (one collective per bucket, not per
parameter), with a non-finite check and optional clipping. Token-mean losses are
first scaled by each rank's `global_token_shares`, so the averaged gradient is
that of the mean over the whole minibatch's tokens, as in the Ray Train stages.
"""
from __future__ import annotations

import datetime
import math
import socket
from typing import Any, Sequence

import torch
import torch.distributed as dist

from torch.distributed.tensor import DTensor

from actors.resources import actor_class
from actors.weight_sync import DEFAULT_CAP_BYTES, pack_into, plan_buckets, unpack_buckets
from rlhf.masked import global_share
from rlhf.sharding import LossScaler, all_sum, local


# Elements per piece of a sum of squares on the CPU: a whole bucket's pow(2) allocated (and
# page-faulted) a 100 MB temporary, 60 ms a call on the small preset's 26M parameters; in
# pieces, 10 ms. CUDA's caching allocator reuses the temporary, where pieces only add launches.
SQ_CHUNK = 1 << 20


def pieces(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`t` flattened, in SQ_CHUNK-element pieces on the CPU, whole elsewhere."""
    flat = t.reshape(-1)
    return flat.split(SQ_CHUNK) if flat.device.type == "cpu" else (flat,)


def sq_sum(t: torch.Tensor, minus: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of squares of `t`'s elements (of `t - minus`'s), on its device, float64 across
    pieces (one sync at the end, by the caller)."""
    acc = torch.zeros((), dtype=torch.float64, device=t.device)
    parts = pieces(t) if minus is None else (a - b for a, b in zip(pieces(t), pieces(minus)))
    for piece in parts:  # a difference is our own temporary: squared in place, one fewer
        acc += (piece.pow(2) if minus is None else piece.pow_(2)).sum()
    return acc


class BucketedGrads:
    """Flat gradient buffers over a model's trainable parameters, allocated once.

    Over this rank's part of each parameter: the whole of it under DDP, its shard
    under FSDP (whose backward has already averaged the gradients over the group).
    """

    def __init__(self, named_params: Sequence[tuple[str, torch.nn.Parameter]],
                 cap_bytes: int = DEFAULT_CAP_BYTES) -> None:
        self.params = list(named_params)
        self.sharded = any(isinstance(p, DTensor) for _, p in self.params)
        self.metas = plan_buckets([(n, local(p)) for n, p in self.params], cap_bytes)
        device = local(self.params[0][1]).device
        self.buffers = [torch.zeros(m.numel, dtype=getattr(torch, m.dtype), device=device)
                        for m in self.metas]
        self.views = unpack_buckets(self.buffers, self.metas)

    def _grads(self):
        for name, p in self.params:
            yield name, (local(p.grad) if p.grad is not None else torch.zeros_like(local(p)))

    def capture(self) -> None:
        """Copy the current .grad into the buffers."""
        pack_into(self.buffers, self.metas, self._grads())

    @torch.no_grad()
    def absorb(self) -> float:
        """Take .grad again after more backward passes; returns ||new - captured||^2,
        the squared norm of what those passes added to the gradient buffers."""
        added = torch.zeros((), dtype=torch.float64, device=self.buffers[0].device)
        for name, grad in self._grads():
            view = self.views[name]
            added += sq_sum(grad, minus=view)  # stays on device: one sync
            view.copy_(grad)
        return self._over_shards(float(added))

    def sq_norm(self) -> float:
        return self._over_shards(float(sum(sq_sum(b) for b in self.buffers)))

    def _over_shards(self, local_sum: float) -> float:
        """A sum over this rank's shards made the sum over the whole gradient."""
        return all_sum(local_sum, self.buffers[0].device) if self.sharded else local_sum

    def all_reduce_mean(self, world_size: int) -> None:
        if world_size > 1 and not self.sharded:  # FSDP's backward reduce-scattered them already
            for b in self.buffers:
                dist.all_reduce(b)
                b.div_(world_size)

    @torch.no_grad()
    def write_back(self, scale: float = 1.0) -> None:
        """The buffers (times `scale`) become .grad, in place where a gradient exists."""
        for name, p in self.params:
            view = self.views[name]
            if p.grad is not None:
                local(p.grad).copy_(view if scale == 1.0 else view * scale)
            elif isinstance(p, DTensor):  # a parameter this step did not reach
                p.grad = DTensor.from_local(view * scale, p.device_mesh, p.placements,
                                            shape=p.shape, stride=p.stride())
            else:
                p.grad = view.clone() if scale == 1.0 else view * scale


class DistributedWorker:
    """Mixin: group membership and the synchronised optimizer step."""

    rank: int = 0
    world_size: int = 1
    nonfinite_steps: int = 0
    device: torch.device = torch.device("cpu")

    def node_endpoint(self) -> tuple[str, int]:
        """This node's address and a currently free port (rank 0 hosts the rendezvous)."""
        import ray

        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def setup_distributed(self, rank: int, world_size: int, endpoint: tuple[str, int],
                          timeout_s: float = 300.0) -> str:
        """Join the group at rank 0's `endpoint` (address, port); returns the backend."""
        addr, port = endpoint
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=rank,
                                world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))
        self.rank, self.world_size = rank, world_size
        self.broadcast_from_rank0()
        return backend

    def trained_module(self) -> torch.nn.Module:
        raise NotImplementedError

    @property
    def lockstep(self) -> bool:
        """Whether every forward is a collective (a sharded model): ranks must run as many."""
        return False

    def most(self, count: int) -> int:
        """The largest `count` over a lockstep group (a collective); `count` itself otherwise."""
        if not self.lockstep:
            return count
        t = torch.tensor([count], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t)

    def throwaway_row(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Two tokens (ids, mask) for a lockstep rank's forward with no rows of its own."""
        return (torch.zeros((1, 2), dtype=torch.long, device=self.device),
                torch.ones((1, 2), dtype=torch.long, device=self.device))

    @torch.no_grad()
    def broadcast_from_rank0(self) -> None:
        """Every rank starts from rank 0's exact weights (loading twice need not be bit-equal)."""
        if self.world_size > 1:
            for t in list(self.trained_module().parameters()) + list(self.trained_module().buffers()):
                dist.broadcast(t.data, src=0)

    def global_token_shares(self, *local_counts: float) -> list[float]:
        """`global_share` of each of this rank's token counts (one all-reduce for all of them).

        A rank's masked-mean loss times its share, once `synced_step` averages the
        gradients, gives the gradient of the mean over the minibatch's tokens on all
        ranks, so splitting a minibatch over more learners leaves the update unchanged
        when response lengths differ between shards. Every rank must call it. 1.0 (and
        no collective) at world size 1.
        """
        if self.world_size == 1:
            return [1.0] * len(local_counts)
        totals = torch.tensor([float(c) for c in local_counts], dtype=torch.float64, device=self.device)
        dist.all_reduce(totals)  # NCCL wants device tensors; float64 counts stay exact
        return [global_share(float(c), g, self.world_size) for c, g in zip(local_counts, totals.tolist())]

    def synced_step(self, grads: BucketedGrads, optimizer: torch.optim.Optimizer,
                    max_grad_norm: float | None, scaler: LossScaler | None = None) -> tuple[float, bool]:
        """All-reduce (mean) the captured gradients, unscale, check, clip, step once.

        Returns (global grad norm before clipping, skipped). Every rank sees the same
        reduced buffers, so every rank makes the same skip decision. With fp16 loss
        scaling an overflow halves the scale and skips; it counts as non-finite only
        once the scale cannot fall further.
        """
        grads.all_reduce_mean(self.world_size)
        loss_scale = scaler.scale if scaler is not None else 1.0
        norm = math.sqrt(grads.sq_norm()) / loss_scale
        if not math.isfinite(norm):
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None and scaler.enabled and scaler.scale > 1.0:
                scaler.update(False)
                return norm, True
            # Skipping keeps the weights finite; the driver stops after too many in a row.
            self.nonfinite_steps += 1
            return norm, True
        if scaler is not None:
            scaler.update(True)
        clip = min(1.0, max_grad_norm / (norm + 1e-6)) if max_grad_norm else 1.0
        grads.write_back(clip / loss_scale)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm, False

    def teardown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


class WorkerGroup:
    """N actors of `worker_cls` (a DistributedWorker) joined in one process group.

    The constructor does not block: actors start and rendezvous in the background
    (so several groups and actors can boot at once); the first call through the
    group waits for the rendezvous and raises if it failed.

    `actor_options` are every rank's Ray options; `rank_options[i]`, merged over them,
    rank i's own (e.g. a PlacementGroupSchedulingStrategy for its bundle, or its
    num_cpus / num_gpus share of that bundle).
    """

    def __init__(self, worker_cls: type, num_workers: int, *args: Any, num_cpus: float = 1.0,
                 num_gpus: float = 0.0, actor_options: dict | None = None,
                 rank_options: Sequence[dict] | None = None, **kwargs: Any) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if rank_options is not None and len(rank_options) != num_workers:
            raise ValueError(f"{len(rank_options)} rank_options for {num_workers} ranks")
        common = {"num_cpus": num_cpus, "num_gpus": num_gpus, **(actor_options or {})}
        self.workers = [actor_class(worker_cls, **(common | dict(own))).remote(*args, **kwargs)
                        for own in (rank_options or [{}] * num_workers)]
        # A ref as an argument: each rank's setup runs once rank 0 has named its endpoint.
        endpoint = self.workers[0].node_endpoint.remote()
        self._setup = [w.setup_distributed.remote(rank, num_workers, endpoint)
                       for rank, w in enumerate(self.workers)]
        self.backend: str | None = None

    def wait_ready(self) -> str:
        """Block until every rank joined the group; returns the backend (gloo / nccl)."""
        import ray

        if self.backend is None:
            self.backend = ray.get(self._setup)[0]
        return self.backend

    def __len__(self) -> int:
        return len(self.workers)

    def call_all(self, method: str, *args: Any, **kwargs: Any) -> list:
        """The same call on every rank; one future per rank."""
        self.wait_ready()
        return [getattr(w, method).remote(*args, **kwargs) for w in self.workers]

    def call_per_rank(self, method: str, args_per_rank: Sequence[tuple],
                      kwargs_per_rank: Sequence[dict] | None = None) -> list:
        if len(args_per_rank) != len(self.workers):
            raise ValueError(f"{len(args_per_rank)} argument tuples for {len(self.workers)} ranks")
        self.wait_ready()
        kws = kwargs_per_rank or [{}] * len(self.workers)
        return [getattr(w, method).remote(*a, **k) for w, a, k in zip(self.workers, args_per_rank, kws)]

    def call_sharded(self, method: str, *shards: Sequence, **common: Any) -> list:
        """Rank i gets element i of every positional sequence (e.g. `batch.chunk(n)`),
        plus the same keyword arguments."""
        for s in shards:
            if len(s) != len(self.workers):
                raise ValueError(f"a shard list of {len(s)} for {len(self.workers)} ranks")
        return self.call_per_rank(method, list(zip(*shards)) if shards else [()] * len(self.workers),
                                  [common] * len(self.workers))

    def call_rank0(self, method: str, *args: Any, **kwargs: Any):
        self.wait_ready()
        return getattr(self.workers[0], method).remote(*args, **kwargs)

    def shutdown(self) -> None:
        import ray

        for w in self.workers:
            ray.kill(w)
        self.workers = []
