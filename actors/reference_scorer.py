"""ReferenceScorer: the frozen PPO-init SFT policy's per-token logprobs (the KL anchor)."""
from __future__ import annotations

import torch

from actors.resources import configure_threads, parse_dtype, pick_device
from rlhf.forward import token_logprobs
from rlhf.models import load_policy


class ReferenceScorer:
    """`temperature`: the sampler's (ppo.temperature), the one the policy learner scores
    with too, so the per-token KL penalty compares the two at the same temperature."""

    def __init__(self, policy_path: str, num_threads: int | None = None, device: str = "auto",
                 dtype: str | None = None, batch_size: int = 64, temperature: float = 1.0) -> None:
        configure_threads(num_threads)
        self.device = pick_device(device)
        self.model = load_policy(policy_path, dtype=parse_dtype(dtype)).to(self.device).eval()
        self.batch_size = batch_size
        self.temperature = float(temperature)

    @torch.no_grad()
    def logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, T] float32 log pi_ref(token_t | <t) at `temperature`, on the CPU
        (alignment of rlhf.experience)."""
        out = [token_logprobs(self.model, ids.to(self.device), mask.to(self.device),
                              temperature=self.temperature).cpu()
               for ids, mask in zip(input_ids.split(self.batch_size), attention_mask.split(self.batch_size))]
        return torch.cat(out)
