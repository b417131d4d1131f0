"""Step-wise batched decoding with a KV cache: the one core behind rollouts, evaluation and serving.

Prompts are left-padded so every row's next token sits in the same column;
positions come from the attention mask. Each row has its own temperature (0 =
greedy), top-p and token limit, and may have its own torch.Generator; a row
ends at EOS, at its limit, or when the caller says so (`Decoding.finish`, e.g.
on a stop string). Iterating a `Decoding` yields each step's new tokens, so a
server can stream them; `rlhf.sampling.sample` collects them into a batch.
Logprobs are under each row's sampling distribution (temperature and top-p
applied; 0 for greedy rows, whose distribution is a point mass). Rows that ask
(`top_logprobs`) also get the model's raw logprobs and top alternatives
(`rlhf.logprobs`); the others pay nothing for them.

Where the time goes, and what this file does about it (bench/generation.py):
- the KV cache is allocated once for prompt + response (`GrowingKV`): appending
  a token writes in place, where transformers' DynamicCache re-copies the whole
  cache with torch.cat every step (quadratic in length; ~15% of a decode step);
- tokens are drawn by inverse CDF (one uniform per row), not torch.multinomial,
  which alone cost more than a small model's forward at batch 256;
- rows that finished are dropped from the batch (and the cache) once a quarter
  of the live rows are done, so long tails do not pay for short rows;
- the LM head runs on the last position only (`logits_to_keep=1`), also in the
  prompt pass, and the attention mask is one preallocated tensor, sliced;
- models on sdpa are switched to `rlhf.decode_attention`: sdpa everywhere except the
  one-query steps, where two matmuls beat the CPU's fused kernel; their steps also
  get a ready additive mask, sliced, so transformers builds none per step.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Iterable, Iterator, Sequence

import torch
from transformers.cache_utils import Cache, DynamicLayer

from rlhf import decode_attention
from rlhf.logprobs import RawLogprobs
from rlhf.models import position_ids_from_mask

# Compact the batch when at most this fraction of the cache's rows is still live:
# each compaction copies the cache once, so copies total at most 1/(1-0.75) = 4 caches.
COMPACT_AT = 0.75
# Positive temperatures below this are raised to it: dividing by less overflows float32 logits.
MIN_TEMPERATURE = 1e-6


@dataclasses.dataclass(frozen=True)
class Step:
    """What one decoding step drew, for the rows that were live before it."""
    index: int              # response position (0 = first response token)
    rows: torch.Tensor      # [n] each row's index in the prompt list
    tokens: torch.Tensor    # [n]
    logprobs: torch.Tensor  # [n]
    raw_rows: torch.Tensor | None = None  # [m] the rows among `rows` that asked for raw logprobs
    raw: RawLogprobs | None = None        # theirs, in the order of raw_rows


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
    return ids, mask


class GrowingKV(DynamicLayer):
    """One layer's keys/values in a buffer sized for the whole sequence up front.

    Behaves as a DynamicLayer (masks see the filled length only) but appends by
    writing into the buffer instead of concatenating.
    """

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity, self.length = capacity, 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        self._k = key_states.new_empty((b, h, self.capacity, d))
        self._v = value_states.new_empty((b, h, self.capacity, value_states.shape[-1]))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache capacity {self.capacity} exceeded ({end} positions)")
        self._k[:, :, self.length:end] = key_states
        self._v[:, :, self.length:end] = value_states
        self.length = end
        self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            # Only the filled part moves: the rest of the buffer is garbage anyway.
            k, v = self._k[indices, :, :self.length], self._v[indices, :, :self.length]
            self._k = k.new_empty((k.shape[0], k.shape[1], self.capacity, k.shape[3]))
            self._v = v.new_empty((v.shape[0], v.shape[1], self.capacity, v.shape[3]))
            self._k[:, :, :self.length], self._v[:, :, :self.length] = k, v
            self.keys, self.values = self._k[:, :, :self.length], self._v[:, :, :self.length]


def _num_layers(model) -> int:
    return model.config.get_text_config(decoder=True).num_hidden_layers


def _last_logits_only(model) -> dict:
    """`logits_to_keep=1` where the model takes it (transformers' causal LMs do)."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def _filter_top_p(logits: torch.Tensor, top_p: float | torch.Tensor) -> torch.Tensor:
    """Keep each row's smallest set of most likely tokens whose mass reaches top_p ([n, 1] or scalar)."""
    if not isinstance(top_p, torch.Tensor):
        if top_p >= 1.0:
            return logits
    else:
        # Rounding can push a cumulative mass past 1: rows at 1 must keep every token.
        top_p = torch.where(top_p >= 1.0, float("inf"), top_p)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    drop = cum - sorted_logits.softmax(-1) > top_p  # keep the token that crosses top_p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def _draw(logits: torch.Tensor, temperature: float | torch.Tensor, top_p: float | torch.Tensor,
          generator: torch.Generator | None = None, uniform: torch.Tensor | None = None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(token [n], its logprob [n]) from last-position logits [n, V], by inverse-CDF sampling.

    One uniform per row (`uniform` [n, 1], else drawn from `generator`) against the
    cumulative (unnormalised) probabilities: an exact draw from the categorical,
    ~10x faster on the CPU than torch.multinomial. temperature and top_p are
    scalars or per-row [n, 1]; a row at temperature 0 takes the argmax.
    """
    logits = logits.float()
    greedy = None
    if isinstance(temperature, torch.Tensor):
        greedy = temperature == 0
        logits = logits / torch.where(greedy, 1.0, temperature.clamp(min=MIN_TEMPERATURE))
    elif temperature == 0:
        return logits.argmax(-1), logits.new_zeros(logits.shape[0])
    elif temperature != 1.0:
        # A Python scalar, as the rollouts always passed it (CUDA divides by its reciprocal).
        logits = logits / temperature
    logits = _filter_top_p(logits, top_p)
    top = logits.amax(-1, keepdim=True)
    cdf = (logits - top).exp_().cumsum_(-1)
    total = cdf[:, -1:]
    if uniform is None:
        uniform = torch.rand(total.shape, generator=generator, device=logits.device)
    u = uniform * total
    # u < total strictly, so the token found has positive mass (filtered tokens add 0).
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
    token = torch.searchsorted(cdf, u, right=True)
    logp = logits.gather(1, token) - top - total.log()
    if greedy is not None:
        token = torch.where(greedy, logits.argmax(-1, keepdim=True), token)
        logp = logp.masked_fill(greedy, 0.0)
    return token.squeeze(1), logp.squeeze(1)


def _per_row(value: float | Sequence[float], device: torch.device) -> float | torch.Tensor:
    return float(value) if isinstance(value, (int, float)) else torch.tensor(
        [float(v) for v in value], device=device)[:, None]


class Decoding:
    """One batched decode; iterate it (once) for a `Step` per token position.

    `max_new_tokens`, `temperature` and `top_p` are one value for all rows or one
    per row. Randomness: `generators` (one per row: a row draws the same tokens
    whatever shares its batch, up to rounding of the batched forward pass), else
    one uniform per cache row per step from the shared `generator`.
    `top_logprobs` (one per row): None, or how many raw alternatives the row
    wants at each step with its token's raw logprob (`Step.raw`); k is the
    largest any row asked for, rows that asked fewer take a prefix.
    """

    def __init__(self, model, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int],
                 eos_id: int, pad_id: int, *, temperature: float | Sequence[float] = 1.0,
                 top_p: float | Sequence[float] = 1.0, generator: torch.Generator | None = None,
                 generators: Sequence[torch.Generator] | None = None,
                 top_logprobs: Sequence[int | None] | None = None) -> None:
        n = len(prompts)
        if generators is not None and len(generators) != n:
            raise ValueError(f"{len(generators)} generators for {n} prompts")
        if top_logprobs is not None and len(top_logprobs) != n:
            raise ValueError(f"{len(top_logprobs)} top_logprobs for {n} prompts")
        self.ready_mask = decode_attention.use_for_decoding(model)
        self.model, self.eos_id = model, eos_id
        self.device = next(model.parameters()).device
        ids, mask = left_pad(prompts, pad_id)
        self.prompt_ids, self.prompt_mask = ids.to(self.device), mask.to(self.device)
        limits = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
        self.limits = torch.tensor(limits, dtype=torch.long, device=self.device)
        self.max_steps = max(limits, default=0)
        if not isinstance(top_p, (int, float)) and all(p >= 1.0 for p in top_p):
            top_p = 1.0  # no row filters: skip the sort
        self.temperature, self.top_p = _per_row(temperature, self.device), _per_row(top_p, self.device)
        self.generator, self.generators = generator, list(generators) if generators is not None else None
        # Rows asking for raw logprobs (None: no row asks, and the loop skips them entirely).
        asks = [k is not None for k in top_logprobs or []]
        self.raw_asks = torch.tensor(asks, device=self.device) if any(asks) else None
        self.raw_k = max((k for k in top_logprobs or [] if k is not None), default=0)
        self._finished: set[int] = set()
        self._started = False

    def finish(self, rows: Iterable[int]) -> None:
        """End these rows (indices in the prompt list) after the step just yielded."""
        self._finished.update(int(r) for r in rows)

    def _uniforms(self, gens: list[torch.Generator], live: list[bool]) -> torch.Tensor:
        # Only live rows draw, so a row's stream does not depend on what else is in the batch.
        u = [torch.rand((), generator=g, device=g.device).item() if alive else 0.0
             for g, alive in zip(gens, live)]
        return torch.tensor(u, device=self.device)[:, None]

    @torch.no_grad()
    def __iter__(self) -> Iterator[Step]:
        if self._started:
            raise RuntimeError("a Decoding can be iterated once")
        self._started = True
        model, device, ids, mask = self.model, self.device, self.prompt_ids, self.prompt_mask
        batch, width = ids.shape
        cache = Cache(layers=[GrowingKV(width + self.max_steps) for _ in range(_num_layers(model))])
        # The live rows' attention mask over prompt + response for the steps after the prompt
        # pass, grown by slicing: ready as an additive [B, 1, 1, L] mask for models on
        # rlhf.decode_attention, else 0/1 [B, L] for transformers to expand each step.
        if self.ready_mask:
            shape, dtype, attend, ignore = (batch, 1, 1), next(model.parameters()).dtype, 0.0, float("-inf")
        else:
            shape, dtype, attend, ignore = (batch,), torch.long, 1, 0
        attn = torch.full((*shape, width + self.max_steps), ignore, dtype=dtype, device=device)
        attn.view(batch, -1)[:, :width].masked_fill_(mask.bool(), attend)
        rows = torch.arange(batch, device=device)  # original row of each cache row
        live = self.limits > 0  # cache rows still sampling
        limits, temperature, top_p, gens = self.limits, self.temperature, self.top_p, self.generators
        asks = self.raw_asks
        step_ids, step_pos = ids, position_ids_from_mask(mask)
        next_pos = mask.sum(1, keepdim=True)
        last_only = _last_logits_only(model)
        for t in range(self.max_steps):
            length = width + t
            logits = model(input_ids=step_ids, attention_mask=mask if t == 0 else attn[..., :length],
                           position_ids=step_pos, past_key_values=cache, use_cache=True,
                           **last_only).logits[:, -1]
            uniform = None if gens is None else self._uniforms(gens, live.tolist())
            token, logp = _draw(logits, temperature, top_p, self.generator, uniform)
            raw_rows = raw = None
            if asks is not None:
                ask = (live & asks).nonzero().squeeze(1)
                raw_rows, raw = rows[ask], RawLogprobs.of(logits[ask], token[ask], self.raw_k)
            yield Step(t, rows[live], token[live], logp[live], raw_rows, raw)
            # The EOS itself is attended (it is a response token); rows that ended before are not.
            attn.view(len(rows), -1)[:, length].masked_fill_(live, attend)
            live = live & (token != self.eos_id) & (limits > t + 1)
            if self._finished:
                live &= ~torch.isin(rows, torch.tensor(sorted(self._finished), device=device))
                self._finished.clear()
            n_live = int(live.sum())
            if n_live == 0:
                return
            if n_live <= COMPACT_AT * len(rows):
                keep = live.nonzero().squeeze(1)
                for layer in cache.layers:
                    layer.batch_select_indices(keep)
                attn, rows, live, next_pos, token = attn[keep], rows[keep], live[keep], next_pos[keep], token[keep]
                limits = limits[keep]
                temperature = temperature[keep] if isinstance(temperature, torch.Tensor) else temperature
                top_p = top_p[keep] if isinstance(top_p, torch.Tensor) else top_p
                gens = [gens[i] for i in keep.tolist()] if gens is not None else None
                asks = asks[keep] if asks is not None else None
            # Rows that ended but are not dropped yet still step; their outputs are never read.
            step_ids, step_pos = token[:, None], next_pos
            next_pos = next_pos + 1
