"""Records -> token batches: SFT (response-only loss), K-way rankings, packed LM text.

Prompt and response are tokenized separately and concatenated, so the prompt ids
a model is trained on are exactly the ids a generator is later given. Every
response ends with EOS: SFT teaches the model to stop, and the RM always reads
its score at a comparable last token.

Demonstrations are packed several to a row the same way (`pack_lm`): each attends
to itself only, so its loss is what its own unpadded row gives, without padding
every short demonstration to the width of the pretraining blocks it is mixed with.

A K-way ranking is one row: the prompt once, then its K completions, each
attending to the prompt and to itself only, with positions restarting after
the prompt. Every completion's score is what a forward pass of prompt +
completion alone gives, but the prompt is computed once instead of K times and
no completion is padded to the longest (bench/stages.py: rm_packing).
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
    """One packed row per prompt ([G, T] fields) and one entry per completion ([N] fields).

    segment_ids: 0 for the prompt, i for the i-th completion, -1 for padding.
    score_index: where each completion's last token sits in the flattened [G * T] row-major grid.
    Rows of one prompt share a group id. Not for `select`/`split`: the fields have two row counts.
    """
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segment_ids: torch.Tensor
    score_index: torch.Tensor
    ranks: torch.Tensor
    group_ids: torch.Tensor

    @property
    def attention_mask(self) -> torch.Tensor:
        """[G, 1, T, T] bool: causal, within the prompt and the token's own completion."""
        return segment_attention_mask(self.segment_ids)

    @property
    def num_tokens(self) -> int:
        return int((self.segment_ids >= 0).sum())


@dataclasses.dataclass
class PackedLMBatch(TensorBatch):
    """Sequences packed several to a row ([B, T] fields), each attending to itself only.

    segment_ids: i >= 1 for a row's i-th sequence, -1 for padding (segment 0, a shared
    prompt in `RankingBatch`, is never used). Two target masks, so one forward serves
    both parts of SFT's mixed batch: demonstration responses and pretraining text.
    """
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segment_ids: torch.Tensor
    loss_mask: torch.Tensor
    ptx_mask: torch.Tensor

    @property
    def attention_mask(self) -> torch.Tensor:
        """[B, 1, T, T] bool: causal, within the token's own sequence."""
        return segment_attention_mask(self.segment_ids)

    @property
    def num_tokens(self) -> int:
        return int((self.segment_ids >= 0).sum())


@dataclasses.dataclass
class EncodedRanking:
    """One prompt's token ids and its K completions' (each ending in EOS unless truncated), with ranks."""
    prompt: list[int]
    responses: list[list[int]]
    ranks: list[int]

    def __len__(self) -> int:
        return len(self.responses)


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
    r = _response_ids(tokenizer, response, limits)
    return p + r, [0] * len(p) + [1] * len(r)


def _response_ids(tokenizer, response: str, limits: TokenLimits) -> list[int]:
    return (_ids(tokenizer, response) + [tokenizer.eos_token_id])[: limits.max_response_tokens]


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
                       ) -> tuple[list[EncodedRanking], int]:
    """Each ranking encoded (as `encode_pair` would each completion), and the count filtered."""
    out, filtered = [], 0
    for c in comps:
        p = _ids(tokenizer, c.prompt)
        if len(p) > limits.max_prompt_tokens:
            filtered += 1
            continue
        out.append(EncodedRanking(p, [_response_ids(tokenizer, r, limits) for r in c.responses], list(c.ranks)))
    return out, filtered


def segment_attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """[G, 1, T, T] bool from [G, T] segment ids (see `RankingBatch`).

    A query attends to earlier keys of the prompt (segment 0) and of its own
    segment. Padding attends to itself only, so no row of the softmax is empty.
    """
    t = segment_ids.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=segment_ids.device).tril()
    query, key = segment_ids[:, :, None], segment_ids[:, None, :]
    same = ((key == 0) | (key == query)) & (key >= 0) & (query >= 0)
    return ((causal & same) | torch.eye(t, dtype=torch.bool, device=segment_ids.device))[:, None]


def collate_rankings(groups: Sequence[EncodedRanking], pad_id: int) -> RankingBatch:
    """One packed row per prompt: K completions scored, all C(K, 2) pairs from them."""
    rows, segments, positions, score_index, ranks, group_ids = [], [], [], [], [], []
    width = max(len(g.prompt) + sum(map(len, g.responses)) for g in groups)
    for g, group in enumerate(groups):
        row, seg, pos = list(group.prompt), [0] * len(group.prompt), list(range(len(group.prompt)))
        for i, (response, rank) in enumerate(zip(group.responses, group.ranks), start=1):
            row += response
            seg += [i] * len(response)
            pos += range(len(group.prompt), len(group.prompt) + len(response))
            score_index.append(g * width + len(row) - 1)
            ranks.append(rank)
            group_ids.append(g)
        pad = width - len(row)
        rows.append(row + [pad_id] * pad)
        segments.append(seg + [-1] * pad)
        positions.append(pos + [0] * pad)
    return RankingBatch(torch.tensor(rows), torch.tensor(positions), torch.tensor(segments),
                        torch.tensor(score_index), torch.tensor(ranks), torch.tensor(group_ids))


def pack_lm(encoded: Sequence[tuple[list[int], list[int]]], blocks: torch.Tensor, pad_id: int
            ) -> PackedLMBatch:
    """Encoded (ids, loss_mask) sequences packed first-fit by decreasing length, then one row per block.

    Rows are as wide as the longest sequence or block. A sequence's first token is
    never a target (in a row of its own nothing predicts it), so no loss reads
    across a boundary. Block tokens are `ptx_mask` targets.
    """
    width = max([len(ids) for ids, _ in encoded] + [blocks.shape[1] if len(blocks) else 0])
    rows: list[list[tuple[list[int], list[int]]]] = []
    for seq in sorted(encoded, key=lambda e: -len(e[0])):
        row = next((r for r in rows if sum(len(ids) for ids, _ in r) + len(seq[0]) <= width), None)
        if row is None:
            rows.append(row := [])
        row.append(seq)
    rows += [[(b.tolist(), [1] * len(b))] for b in blocks]
    n = len(rows)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    pos = torch.zeros((n, width), dtype=torch.long)
    seg = torch.full((n, width), -1, dtype=torch.long)
    loss = torch.zeros((n, width))
    for r, row in enumerate(rows):
        at = 0
        for i, (s_ids, s_mask) in enumerate(row, start=1):
            end = at + len(s_ids)
            ids[r, at:end], pos[r, at:end], seg[r, at:end] = torch.tensor(s_ids), torch.arange(len(s_ids)), i
            loss[r, at + 1:end] = torch.tensor(s_mask[1:], dtype=torch.float)
            at = end
    is_block = torch.zeros((n, 1))
    is_block[n - len(blocks):] = 1.0
    return PackedLMBatch(ids, pos, seg, loss * (1 - is_block), loss * is_block)


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
