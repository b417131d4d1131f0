"""Records -> token batches: SFT (response-only loss), K-way rankings, packed LM text.

Prompt and response are tokenized separately and concatenated, so the prompt ids
a model is trained on are exactly the ids a generator is later given. Every
response ends with EOS: SFT teaches the model to stop, and the RM always reads
its score at a comparable last token.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from rlhf.batch import TensorBatch
from rlhf.data.formats import Comparison, Demonstration


@dataclasses.dataclass
class LMBatch(TensorBatch):
    """Right-padded sequences; loss_mask marks the target tokens that count."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor


@dataclasses.dataclass
class RankingBatch(TensorBatch):
    """Every completion of every prompt, flattened; rows of one prompt share a group id."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    ranks: torch.Tensor
    group_ids: torch.Tensor


@dataclasses.dataclass
class TokenLimits:
    max_prompt_tokens: int
    max_response_tokens: int


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_pair(tokenizer, prompt: str, response: str, limits: TokenLimits
                ) -> tuple[list[int], list[int]] | None:
    """(ids, loss_mask) of prompt + response + EOS; None when the prompt is too long.

    Over-long prompts are dropped, as the paper filters prompts over 1k tokens;
    over-long responses are truncated (and then carry no EOS).
    """
    p = _ids(tokenizer, prompt)
    if len(p) > limits.max_prompt_tokens:
        return None
    r = (_ids(tokenizer, response) + [tokenizer.eos_token_id])[: limits.max_response_tokens]
    return p + r, [0] * len(p) + [1] * len(r)


def pad_right(seqs: Sequence[Sequence[int]], masks: Sequence[Sequence[int]], pad_id: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    loss = torch.zeros((len(seqs), width), dtype=torch.float)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        attn[i, : len(s)] = 1
        loss[i, : len(m)] = torch.tensor(m, dtype=torch.float)
    return ids, attn, loss


def encode_demonstrations(tokenizer, demos: Sequence[Demonstration], limits: TokenLimits
                          ) -> tuple[list[tuple[list[int], list[int]]], int]:
    """Encoded (ids, loss_mask) pairs and the number filtered for over-long prompts."""
    out = [encode_pair(tokenizer, d.prompt, d.response, limits) for d in demos]
    kept = [e for e in out if e is not None]
    return kept, len(out) - len(kept)


def collate_encoded(encoded: Sequence[tuple[list[int], list[int]]], pad_id: int) -> LMBatch:
    ids, attn, loss = pad_right([e[0] for e in encoded], [e[1] for e in encoded], pad_id)
    return LMBatch(ids, attn, loss)


def encode_comparisons(tokenizer, comps: Sequence[Comparison], limits: TokenLimits
                       ) -> tuple[list[list[tuple[list[int], int]]], int]:
    """Per prompt, its K encoded completions with their ranks; and the count filtered."""
    out, filtered = [], 0
    for c in comps:
        rows = [encode_pair(tokenizer, c.prompt, r, limits) for r in c.responses]
        if any(r is None for r in rows):
            filtered += 1
            continue
        out.append([(ids, rank) for (ids, _), rank in zip(rows, c.ranks)])
    return out, filtered


def collate_rankings(groups: Sequence[Sequence[tuple[list[int], int]]], pad_id: int) -> RankingBatch:
    """One row per completion (K forward passes per prompt, not 2*C(K,2))."""
    seqs, ranks, group_ids = [], [], []
    for g, group in enumerate(groups):
        for ids, rank in group:
            seqs.append(ids)
            ranks.append(rank)
            group_ids.append(g)
    ids, attn, _ = pad_right(seqs, [[1] * len(s) for s in seqs], pad_id)
    return RankingBatch(ids, attn, torch.tensor(ranks), torch.tensor(group_ids))


def pack_text(tokenizer, texts: Sequence[str], seq_len: int) -> torch.Tensor:
    """Concatenate documents (EOS between them) and cut into [N, seq_len] blocks."""
    stream: list[int] = []
    for t in texts:
        stream += _ids(tokenizer, t) + [tokenizer.eos_token_id]
    n = len(stream) // seq_len
    if n == 0:
        raise ValueError(f"{len(stream)} tokens of text is less than one block of {seq_len}")
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def lm_batch(blocks: torch.Tensor) -> LMBatch:
    """Packed blocks: every token attended and every target counted."""
    ones = torch.ones_like(blocks)
    return LMBatch(blocks, ones, ones.float())
