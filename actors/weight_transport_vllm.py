"""GPU weight transport: a learner group -> vLLM generators through vLLM's weight transfer.

vLLM 0.33's trainer side does the transfer: `WeightTransferTrainerFactory.trainer_init`
with an `NCCLTrainerInitInfo` (separate GPUs) or `IPCTrainerInitInfo` (colocated),
a `ModuleSource` over the learner's HF model, and a client for the inference
side; then `send_weights()` per sync. It is bucketed by vLLM itself (`packed`:
parameters packed into a few large buffers, double-buffered), not one call per
parameter. Our part:

- `GeneratorClient`: vLLM's four-call client protocol (`VLLMWeightSyncClient`)
  over our `RolloutGenerator` actors (`call_engine` -> `VLLMEngine`). vLLM's own
  trainer gives every engine the same `rank_offset` (it expects one data-parallel
  deployment); our generators are independent `LLM`s, so each gets its own offset.
- `VLLMWeightSender`: lives in every learner rank (vLLM's trainer side runs on all
  of them: rank 0 sends; the others only join the gathers of their FSDP shards,
  or do nothing for a DDP replica); `send(version)` pushes the weights and
  returns the checksum of the whole weights.
- `connect` / `sync`: the driver's two calls, on every rank of the group at once.
  They reach the learners through Ray's `__ray_call__` (a function run on the
  actor instance), so the learner class needs no transport-specific methods.
  `sync` verifies every generator's checksum against rank 0's before it records
  the new version: a generator whose weights did not arrive keeps its old version
  and its batches are refused.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from actors.weight_sync import module_checksum
from rlhf import sharding

BACKENDS = ("nccl", "ipc")


def rank_offsets(world_sizes: Sequence[int], first: int = 1) -> list[int]:
    """NCCL rank of each generator's first worker; the trainer (sender) is rank 0."""
    out, nxt = [], first
    for n in world_sizes:
        out.append(nxt)
        nxt += int(n)
    return out


def per_generator_init_infos(init_info: dict[str, Any], world_sizes: Sequence[int]) -> list[dict[str, Any]]:
    """The worker-side init payload for each generator: its own `rank_offset` (NCCL only;
    IPC payloads carry none and go out unchanged)."""
    if "rank_offset" not in init_info:
        return [dict(init_info) for _ in world_sizes]
    offsets = rank_offsets(world_sizes, first=int(init_info["rank_offset"]))
    return [{**init_info, "rank_offset": off} for off in offsets]


def trainer_init_kwargs(backend: str, *, world_sizes: Sequence[int], rank: int = 0,
                        master_address: str | None = None, master_port: int | None = None,
                        packed: bool = True, packed_buffer_size_bytes: int | None = None) -> dict[str, Any]:
    """Fields of vLLM's `NCCLTrainerInitInfo` / `IPCTrainerInitInfo` for learner `rank` (its
    rank in the learner group, which vLLM's `ModuleSource` takes FSDP meshes in; 0 sends).
    Every rank gets the same rendezvous fields: vLLM's NCCL init info requires them."""
    kw: dict[str, Any] = dict(rank=int(rank), packed=packed)
    if packed_buffer_size_bytes is not None:
        kw["packed_buffer_size_bytes"] = int(packed_buffer_size_bytes)
    if backend == "nccl":
        if master_address is None or master_port is None:
            raise ValueError("the nccl backend needs master_address and master_port")
        kw.update(master_address=master_address, master_port=int(master_port),
                  world_size=1 + sum(int(n) for n in world_sizes))
    elif backend != "ipc":
        raise ValueError(f"unknown weight-transfer backend {backend!r}; choose one of {BACKENDS}")
    return kw


def trainer_init_info(backend: str, **kw: Any):
    from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

    fields = trainer_init_kwargs(backend, **kw)  # validates the backend first
    return {"nccl": NCCLTrainerInitInfo, "ipc": IPCTrainerInitInfo}[backend](**fields)


class GeneratorClient:
    """vLLM's `VLLMWeightSyncClient` protocol, fanned out to our generator actors.

    Each call blocks until every generator has done it (NCCL needs `update_weights`
    running on all of them while the trainer broadcasts; vLLM's trainer engine runs
    this client's `update_weights` in a thread for that).
    """

    def __init__(self, generators: Sequence[Any], world_sizes: Sequence[int]) -> None:
        if len(generators) != len(world_sizes):
            raise ValueError(f"{len(generators)} generators but {len(world_sizes)} world sizes")
        self.generators = list(generators)
        self.world_sizes = [int(n) for n in world_sizes]
        self.version: int | None = None  # what finish_weight_update labels the weights

    def _all(self, method: str, per_generator_args: Sequence[tuple]) -> list:
        import ray

        return ray.get([g.call_engine.remote(method, *args)
                        for g, args in zip(self.generators, per_generator_args, strict=True)])

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        infos = per_generator_init_infos(init_info, self.world_sizes)
        self._all("init_weight_transfer_engine", [(i,) for i in infos])

    def start_weight_update(self) -> None:
        self._all("start_weight_update", [()] * len(self.generators))

    def update_weights(self, update_info: dict[str, Any] | list[dict[str, Any]]) -> None:
        self._all("update_weights", [(update_info,)] * len(self.generators))

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        version = self.version if weight_version is None else int(weight_version)
        self._all("finish_weight_update", [(version,)] * len(self.generators))


class VLLMWeightSender:
    """One learner rank's end of vLLM's weight transfer for one HF model (plain or FSDP2)."""

    def __init__(self, model: torch.nn.Module, generators: Sequence[Any], world_sizes: Sequence[int],
                 backend: str = "nccl", rank: int = 0, **init_kw: Any) -> None:
        from vllm.distributed.weight_transfer import ModuleSource, WeightTransferTrainerFactory

        self.model, self.rank = model, int(rank)
        self.client = GeneratorClient(generators, world_sizes)  # only rank 0's engine calls it
        info = trainer_init_info(backend, world_sizes=world_sizes, rank=rank, **init_kw)
        # Rank 0: the rendezvous (vLLM runs the generators' init RPC concurrently with opening
        # our end). Other ranks: no rendezvous, the engine only drives the source in send_weights.
        self.engine = WeightTransferTrainerFactory.trainer_init(
            info, client=self.client, source=ModuleSource(model))

    @torch.no_grad()
    def send(self, version: int) -> str | None:
        """Push the current weights as `version`; every rank of the group calls it at once.

        Returns the checksum of the whole weights: under fsdp gathered from the shards, a
        collective every rank runs in the same order; None from a replica's rank > 0,
        whose copy is rank 0's.
        """
        self.client.version = int(version)
        self.engine.send_weights()
        if self.rank != 0 and not sharding.is_sharded(self.model):
            return None
        return module_checksum(self.model)  # gathered and hashed one whole tensor at a time

    def close(self) -> None:
        self.engine.shutdown()


# ---- run inside each learner actor (through __ray_call__) ----

def _attach(learner, generators, world_sizes, backend, init_kw) -> None:
    # The group rank: vLLM's ModuleSource names an FSDP shard's owners by it.
    learner._vllm_weight_sender = VLLMWeightSender(learner.model, generators, world_sizes,
                                                   backend, rank=learner.rank, **init_kw)


def _send(learner) -> tuple[str | None, int]:
    version = int(learner.version)
    return learner._vllm_weight_sender.send(version), version


# ---- driver side ----

def _values(refs: Sequence[Any]) -> list:
    """Every ref's value; the first failure raises as soon as it is known, since the other
    ranks may be stuck in a collective with a dead one until its timeout."""
    import ray

    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        ray.get(ready[0])
    return ray.get(list(refs))


def connect(learners: Sequence[Any], generators: Sequence[Any], backend: str = "nccl", **init_kw: Any) -> None:
    """Open the transfer between a learner group (its ranks' actor handles, in rank order) and
    every generator. Every rank attaches: vLLM's trainer side runs on all of them, and under
    fsdp each holds only a shard. NCCL's rendezvous store listens on rank 0's node."""
    import ray

    sizes = ray.get([g.call_engine.remote("transfer_world_size") for g in generators])
    if backend == "nccl" and "master_address" not in init_kw:
        address, port = ray.get(learners[0].node_endpoint.remote())
        init_kw = {"master_address": address, "master_port": int(port), **init_kw}
    _values([lr.__ray_call__.remote(_attach, list(generators), sizes, backend, init_kw) for lr in learners])


def sync(learners: Sequence[Any], generators: Sequence[Any]) -> tuple[int, str]:
    """One verified, versioned sync, sent by every rank at once (rank 0 over the wire, the
    others into its gathers); returns (version, checksum), rank 0's, that every generator
    now holds."""
    import ray

    digest, version = _values([lr.__ray_call__.remote(_send) for lr in learners])[0]
    got = ray.get([g.checksum.remote() for g in generators])
    if any(c != digest for c in got):
        raise RuntimeError(f"vLLM weight sync failed: learner checksum {digest}, generators {got}")
    ray.get([g.set_weight_version.remote(version) for g in generators])
    return version, digest
