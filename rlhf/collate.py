"""Records -> token batches: SFT (response-only loss), K-way rankings, packed LM text.

Prompt and response are tokenized separately and concatenated, so the prompt ids
a model is trained on are exactly the ids a generator is later given. Every
response ends with EOS: SFT teaches the model to stop, and the RM always reads
its score at a comparable last token.

Demonstrations are packed several to a row the same way (`pack_lm`): each attends
to itself only, so its loss is what its own unpadded row gives, without padding
every short demonstration to the width of the pretraining blocks it is mixed with.

A K-way ranking is the prompt once, then its K completions, each attending to
the prompt and to itself only, with positions restarting after the prompt;
several rankings share a row when they fit. Every completion's score is what a
forward pass of prompt + completion alone gives, but the prompt is computed once
instead of K times and no completion is padded to the longest (bench/stages.py:
rm_packing).
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
    """Packed rankings ([G, T] fields: one or more prompts a row) and one entry per completion ([N] fields).

    segment_ids: a prompt's tokens, then each of its completions, get their own id (unique in
    the row), -1 for padding; prompt_ids: the id of the prompt each token's completion answers.
    score_index: where each completion's last token sits in the flattened [G * T] row-major grid.
    Completions of one prompt share a group id. Not for `select`/`split`: the fields have two row counts.
    """
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segment_ids: torch.Tensor
    prompt_ids: torch.Tensor
    score_index: torch.Tensor
    ranks: torch.Tensor
    group_ids: torch.Tensor

    @property
    def attention_mask(self) -> torch.Tensor:
        """[G, 1, T, T] bool: causal, within the token's prompt and its own completion."""
        return segment_attention_mask(self.segment_ids, self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return int((self.segment_ids >= 0).sum())

    @property
    def num_prompts(self) -> int:
        """Rankings in the batch (a row may hold several)."""
        return int(self.group_ids.unique().numel())


@dataclasses.dataclass
class PackedLMBatch(TensorBatch):
    """Sequences packed several to a row ([B, T] fields), each attending to itself only.

    segment_ids: i >= 1 for a row's i-th sequence, -1 for padding. Two target masks, so one
    forward serves both parts of SFT's mixed batch: demonstration responses and pretraining text.
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


def segment_attention_mask(segment_ids: torch.Tensor, prompt_ids: torch.Tensor | None = None) -> torch.Tensor:
    """[G, 1, T, T] bool from [G, T] segment ids (and, for rankings, prompt ids: see `RankingBatch`).

    A query attends to earlier keys of its own segment and of the prompt its segment
    answers. Padding attends to itself only, so no row of the softmax is empty.
    """
    t = segment_ids.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=segment_ids.device).tril()
    query, key = segment_ids[:, :, None], segment_ids[:, None, :]
    same = key == query
    if prompt_ids is not None:
        same = same | (key == prompt_ids[:, :, None])
    same = same & (key >= 0) & (query >= 0)
    return ((causal & same) | torch.eye(t, dtype=torch.bool, device=segment_ids.device))[:, None]


def first_fit(widths: Sequence[int], width: int) -> list[list[int]]:
    """Indices packed into rows of `width`, longest first, each into the first row with room."""
    rows: list[list[int]] = []
    room: list[int] = []
    for j in sorted(range(len(widths)), key=lambda j: -widths[j]):
        r = next((r for r, free in enumerate(room) if widths[j] <= free), None)
        if r is None:
            rows.append([])
            room.append(width)
            r = len(rows) - 1
        rows[r].append(j)
        room[r] -= widths[j]
    return rows


def collate_rankings(groups: Sequence[EncodedRanking], pad_id: int) -> RankingBatch:
    """Rankings packed into rows as wide as the widest: K completions scored, all C(K, 2) pairs from them.

    A row holds as many whole rankings as fit (`first_fit`), so short rankings no longer
    pad to the longest; each completion still sees only its prompt and itself.
    """
    widths = [len(g.prompt) + sum(map(len, g.responses)) for g in groups]
    width = max(widths)
    ids, pos, seg, prm, ends = [], [], [], [], {}
    for r, members in enumerate(first_fit(widths, width)):
        row_ids, row_pos, row_seg, row_prm, base = [], [], [], [], 0
        for j in members:
            group, p = groups[j], len(groups[j].prompt)
            for i, tokens in enumerate([group.prompt, *group.responses]):
                start = 0 if i == 0 else p  # positions restart after the prompt for every completion
                row_ids += tokens
                row_pos += range(start, start + len(tokens))
                row_seg += [base + i] * len(tokens)
                row_prm += [base] * len(tokens)
                if i:
                    ends.setdefault(j, []).append(r * width + len(row_ids) - 1)
            base += len(group.responses) + 1
        pad = width - len(row_ids)
        ids.append(row_ids + [pad_id] * pad)
        pos.append(row_pos + [0] * pad)
        seg.append(row_seg + [-1] * pad)
        prm.append(row_prm + [-1] * pad)
    score_index = [e for j in range(len(groups)) for e in ends[j]]
    ranks = [rank for g in groups for rank in g.ranks]
    group_ids = [j for j, g in enumerate(groups) for _ in g.responses]
    return RankingBatch(*map(torch.tensor, (ids, pos, seg, prm, score_index, ranks, group_ids)))


def pack_lm(encoded: Sequence[tuple[list[int], list[int]]], blocks: torch.Tensor, pad_id: int
            ) -> PackedLMBatch:
    """Encoded (ids, loss_mask) sequences packed first-fit by decreasing length, then one row per block.

    Rows are as wide as the longest sequence or block. A sequence's first token is
    never a target (in a row of its own nothing predicts it), so no loss reads
    across a boundary. Block tokens are `ptx_mask` targets.
    """
    width = max([len(ids) for ids, _ in encoded] + [blocks.shape[1] if len(blocks) else 0])
    rows = [[encoded[j] for j in row] for row in first_fit([len(ids) for ids, _ in encoded], width)]
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
