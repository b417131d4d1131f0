"""ReferenceScorer: the frozen PPO-init SFT policy's per-token logprobs (the KL anchor).

One rank of a group (`actors.group.WorkerGroup`, `ppo.num_reference_scorers` ranks):
alone it holds the whole model; in a group of several its weights are sharded
(FSDP2, `rlhf.sharding.shard_frozen`) and each rank scores its share of a batch,
since a paper-size policy fits on no single GPU.
"""
from __future__ import annotations

import torch

from actors.group import DistributedWorker
from actors.resources import configure_threads, parse_dtype, pick_device
from rlhf.forward import token_logprobs
from rlhf.models import load_policy
from rlhf.sharding import shard_frozen


class ReferenceScorer(DistributedWorker):
    """`temperature`: the sampler's (ppo.temperature), the one the policy learner scores
    with too, so the per-token KL penalty compares the two at the same temperature."""

    def __init__(self, policy_path: str, num_threads: int | None = None, device: str = "auto",
                 dtype: str | None = None, batch_size: int = 64, temperature: float = 1.0) -> None:
        configure_threads(num_threads)
        self.device = pick_device(device)
        self.model = load_policy(policy_path, dtype=parse_dtype(dtype)).to(self.device).eval()
        self.batch_size = batch_size
        self.temperature = float(temperature)

    def setup_distributed(self, rank: int, world_size: int, endpoint: tuple[str, int],
                          timeout_s: float = 300.0) -> str:
        backend = super().setup_distributed(rank, world_size, endpoint, timeout_s)
        if world_size > 1:  # every rank holds rank 0's weights now; keep a shard of them
            self.model = shard_frozen(self.model, self.device, world_size)
        return backend

    def trained_module(self) -> torch.nn.Module:
        return self.model  # frozen: only the start-up broadcast reads it

    @property
    def lockstep(self) -> bool:
        return self.world_size > 1

    @torch.no_grad()
    def logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, T] float32 log pi_ref(token_t | <t) at `temperature`, on the CPU
        (alignment of rlhf.experience), `batch_size` rows at a time; sharded, every rank
        runs as many forwards as the busiest one."""
        def forward(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return token_logprobs(self.model, ids.to(self.device), mask.to(self.device),
                                  temperature=self.temperature).cpu()
        chunks = list(zip(input_ids.split(self.batch_size), attention_mask.split(self.batch_size)))
        extra = self.most(len(chunks)) - len(chunks)  # before any forward: collectives go in order
        out = [forward(ids, mask) for ids, mask in chunks]
        for _ in range(extra):
            forward(*self.throwaway_row())
        return torch.cat(out) if out else torch.zeros(input_ids.shape, dtype=torch.float32)
