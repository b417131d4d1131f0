"""RewardScorer: the frozen reward model, one normalised scalar per sequence.

Normalisation is the RM's own `reward_bias` (labeler demonstrations score 0 on
average, set at the end of RM training); `ScalarModel.score` adds it and reads
the score at the last attended token, i.e. the last response token.
"""
from __future__ import annotations

import torch

from actors.resources import configure_threads, parse_dtype, pick_device
from rlhf.models import ScalarModel


class RewardScorer:
    def __init__(self, rm_path: str, num_threads: int | None = None, device: str = "auto",
                 dtype: str | None = None, batch_size: int = 64) -> None:
        configure_threads(num_threads)
        self.device = pick_device(device)
        self.model = ScalarModel.from_pretrained(rm_path, dtype=parse_dtype(dtype)).to(self.device).eval()
        self.batch_size = batch_size

    @torch.no_grad()
    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B] float32 rewards on the CPU, computed `batch_size` rows at a time."""
        out = [self.model.score(ids.to(self.device), mask.to(self.device)).float().cpu()
               for ids, mask in zip(input_ids.split(self.batch_size), attention_mask.split(self.batch_size))]
        return torch.cat(out)

    def reward_bias(self) -> float:
        return self.model.reward_bias
