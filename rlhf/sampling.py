"""Batched sampling into one prompt + response tensor: the `hf` rollout engine's and evaluation's sampler.

Built on the step-wise core `rlhf.decoding.Decoding` (KV cache, inverse-CDF
draws, batch compaction). Rows stop at EOS or after `max_new_tokens`. Returns
each sampled token's logprob under the sampling distribution (temperature
applied). `sample_and_score` is the evaluation loop: sample prompts in chunks
from one seeded generator, hand each chunk to a scoring function.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence, TypeVar

import torch

from rlhf.batch import TensorBatch
from rlhf.decoding import Decoding, left_pad

__all__ = ["Samples", "left_pad", "sample", "SampledChunk", "decode_responses", "sample_and_score",
           "text_sampler"]
T = TypeVar("T")


@dataclasses.dataclass
class Samples(TensorBatch):
    """prompt (left-padded) + response (right-padded) in one [B, P+R] tensor."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    action_mask: torch.Tensor      # 1 on response tokens (including the EOS that ended it)
    sampler_logprobs: torch.Tensor  # [B, P+R], 0 outside the action mask
    prompt_width: int


@torch.no_grad()
def sample(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos_id: int, pad_id: int,
           temperature: float | Sequence[float] = 1.0, top_p: float | Sequence[float] = 1.0,
           generator: torch.Generator | None = None,
           generators: Sequence[torch.Generator] | None = None) -> Samples:
    """Sample every prompt to EOS or max_new_tokens; per-row settings as in `Decoding`."""
    decoding = Decoding(model, prompts, max_new_tokens, eos_id, pad_id, temperature=temperature,
                        top_p=top_p, generator=generator, generators=generators)
    ids, mask = decoding.prompt_ids, decoding.prompt_mask
    batch, width, device = ids.shape[0], ids.shape[1], ids.device
    out_tokens = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
    out_logp = torch.zeros((batch, max_new_tokens), device=device)
    out_mask = torch.zeros((batch, max_new_tokens), dtype=torch.long, device=device)
    used = 0
    for step in decoding:
        t = step.index
        out_tokens[step.rows, t], out_logp[step.rows, t], out_mask[step.rows, t] = step.tokens, step.logprobs, 1
        used = t + 1
    full_ids = torch.cat([ids, out_tokens[:, :used]], dim=1)
    full_mask = torch.cat([mask, out_mask[:, :used]], dim=1)
    action = torch.cat([torch.zeros_like(mask), out_mask[:, :used]], dim=1)
    logps = torch.cat([torch.zeros(mask.shape, device=device), out_logp[:, :used]], dim=1)
    return Samples(full_ids.cpu(), full_mask.cpu(), action.cpu(), logps.cpu(), width)


def decode_responses(tokenizer, samples: Samples, skip_special_tokens: bool = True) -> list[str]:
    """Each row's response tokens as text, by default without special tokens (the EOS, a sampled pad)."""
    return [tokenizer.decode(row[m.bool()].tolist(), skip_special_tokens=skip_special_tokens)
            for row, m in zip(samples.input_ids, samples.action_mask)]


@dataclasses.dataclass
class SampledChunk:
    """One sampling call of `sample_and_score`: which prompts, and what was sampled for them."""
    rows: range          # the chunk's prompts, as indices into the whole list
    samples: Samples
    tokenizer: object

    @functools.cached_property
    def responses(self) -> list[str]:
        return decode_responses(self.tokenizer, self.samples)


def sample_and_score(model, tokenizer, prompt_ids: Sequence[Sequence[int]],
                     score: Callable[[SampledChunk], Sequence[T]], *, chunk_size: int,
                     max_new_tokens: int, seed: int, temperature: float = 1.0,
                     top_p: float = 1.0) -> list[T]:
    """`score(chunk)` (one value per row) of every prompt's sample, in prompt order.

    Chunks of `chunk_size` prompts are sampled in order from one generator seeded
    with `seed` on the model's device, so the samples depend on seed, chunk_size
    and the prompts only. The model is not switched to eval mode here.
    """
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    out: list[T] = []
    for start in range(0, len(prompt_ids), chunk_size):
        rows = range(start, min(start + chunk_size, len(prompt_ids)))
        s = sample(model, [prompt_ids[i] for i in rows], max_new_tokens, tokenizer.eos_token_id,
                   tokenizer.pad_token_id, temperature=temperature, top_p=top_p, generator=generator)
        scores = list(score(SampledChunk(rows, s, tokenizer)))
        if len(scores) != len(rows):
            raise ValueError(f"score returned {len(scores)} values for a chunk of {len(rows)} rows")
        out += scores
    return out


def text_sampler(model, tokenizer, *, max_new_tokens: int, seed: int,
                 chunk_size: int = 512) -> Callable[[list[str]], list[str]]:
    """prompts -> one T=1 response text each: what a labeler is shown to rank."""
    def draw(prompts: list[str]) -> list[str]:
        ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        with torch.no_grad():
            return sample_and_score(model, tokenizer, ids, lambda c: c.responses, chunk_size=chunk_size,
                                    max_new_tokens=max_new_tokens, seed=seed)
    return draw
