"""The rollout engine interface: what a RolloutGenerator needs from hf or vLLM.

An engine owns one copy of the policy and does three things: sample responses
for token-id prompts, take new weights by name, and fingerprint its weights.
Engines are constructed as `Engine(policy_path, *, seed, **engine_kwargs)`.
"""
from __future__ import annotations

from typing import Iterable, Protocol, runtime_checkable

import torch

from rlhf.sampling import Samples


@runtime_checkable
class Engine(Protocol):
    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int | None = None) -> Samples:
        """Left-padded prompt + right-padded response per row, as `rlhf.sampling.Samples`:
        `action_mask` on response tokens (including the EOS that ended one),
        `sampler_logprobs[:, t]` = log p(token_t | <t) under the sampling distribution,
        0 outside the action mask. Rows are in prompt order. `seed` makes one call
        repeatable; None continues the engine's own random stream."""
        ...

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], borrow: bool = False) -> None:
        """Overwrite the policy's parameters, named as in the learner's HF model.

        `borrow`: the tensors are immutable snapshots (object-store memory), so the
        engine may use them in place instead of copying; it never writes to them."""
        ...

    def state_checksum(self) -> str:
        """`actors.weight_sync.checksum` of the weights now in use, in the learner's names
        and dtypes, so it equals the learner's checksum exactly after a faithful sync."""
        ...
