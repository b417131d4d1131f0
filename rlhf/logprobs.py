"""The model's own logprobs, for callers that report them (the OpenAI endpoint's `logprobs`/`echo`).

"Raw" means the log-softmax of the logits as the model computes them: no
temperature, no top-p, whatever the row was sampled with. That is what OpenAI
and vLLM report by default, and it is the distribution the model defines, so a
scoring harness gets the same numbers whatever sampling settings it sent. The
sampler's own logprobs (tempered, truncated) stay in `rlhf.decoding.Step.logprobs`.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from rlhf.models import position_ids_from_mask


@dataclasses.dataclass(frozen=True)
class RawLogprobs:
    """Raw logprobs at m positions: the token there, and the k most likely alternatives."""
    chosen: torch.Tensor        # [m] logprob of the token at each position
    top_ids: torch.Tensor       # [m, k] most likely first
    top_logprobs: torch.Tensor  # [m, k]

    @classmethod
    def of(cls, logits: torch.Tensor, tokens: torch.Tensor, k: int) -> RawLogprobs:
        """From logits [m, V] and the tokens [m] that were taken there."""
        logp = torch.log_softmax(logits.float(), dim=-1)
        top = logp.topk(min(k, logp.shape[-1]), dim=-1)
        return cls(logp.gather(-1, tokens[:, None]).squeeze(-1), top.indices, top.values)

    def __len__(self) -> int:
        return self.chosen.shape[0]

    def select(self, index: torch.Tensor | slice) -> RawLogprobs:
        return RawLogprobs(self.chosen[index], self.top_ids[index], self.top_logprobs[index])


# Positions (rows x padded width) per scoring pass: all-position logits are [positions, V]
# floats, about 1.6 GB at 8192 positions and GPT-2's 50k vocabulary.
MAX_POSITIONS = 8192


@torch.no_grad()
def prompt_logprobs(model, prompts: Sequence[Sequence[int]], k: int, pad_id: int,
                    max_positions: int = MAX_POSITIONS) -> list[RawLogprobs]:
    """Each prompt's tokens 1.. under the model given the tokens before them ([len - 1] each).

    Left-padded forward passes over all positions, no cache, as many prompts per
    pass as `max_positions` allows (at least one); the first token has nothing to
    condition on, so it has no entry.
    """
    out: list[RawLogprobs] = []
    group: list[Sequence[int]] = []
    for p in prompts:
        if group and (len(group) + 1) * max(map(len, group + [p])) > max_positions:
            out += _score(model, group, k, pad_id)
            group = []
        group.append(p)
    return out + (_score(model, group, k, pad_id) if group else [])


def _score(model, prompts: Sequence[Sequence[int]], k: int, pad_id: int) -> list[RawLogprobs]:
    from rlhf.decoding import left_pad  # decoding imports this module

    device = next(model.parameters()).device
    ids, mask = (t.to(device) for t in left_pad(prompts, pad_id))
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    width, out = ids.shape[1], []
    for i, p in enumerate(prompts):
        # Positions width-len(p) .. width-2 predict the prompt's tokens 1 .. len-1.
        start = width - len(p)
        out.append(RawLogprobs.of(logits[i, start:width - 1], ids[i, start + 1:], k))
    return out
