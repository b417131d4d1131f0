"""The CPU serving engine: HF model, batched KV-cache decoding, stop strings, streaming.

`ServeEngine` is plain Python (no Ray): the prompt checks of `PromptCodec`, and
one decoding loop (`rlhf.decoding`, the rollouts' core) over any number of
rows, each with its own temperature (0 = greedy), top_p, max_tokens, stop
strings and seed, yielding every row's new text after each token, with
the model's raw logprobs for rows that ask and the echoed prompt first for rows
that echo. `BatchedEngine` puts Ray Serve's `@serve.batch` in front of it: requests
that arrive together share one decoding loop, and each request receives its
rows' text step by step (which is what streaming sends, token by token).

Seeds: a row's sampler is its own `torch.Generator`, so a seeded request draws
the same tokens whatever else shares its batch, up to float rounding of the
batched forward pass (the same caveat vLLM documents).
"""
from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Callable, Iterable, Iterator, Sequence

import torch
from ray import serve

from orchestration.serve.detokenize import RowText, Scored, TokenLogprob, decode, prefix_offsets
from orchestration.serve.prompts import PromptCodec
from rlhf.decoding import Decoding
from rlhf.logprobs import RawLogprobs, prompt_logprobs
from rlhf.models import load_policy


@dataclass(frozen=True)
class Row:
    """One sequence to generate."""
    prompt_ids: Sequence[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None  # raw logprobs with this many top alternatives per token; None: none
    echo: bool = False           # the prompt's text (and logprobs) come first; max_tokens may be 0


@dataclass(frozen=True)
class Delta:
    """A row's news after one decoding step."""
    text: str                   # new text, safe to send (never part of a stop string)
    finish_reason: str | None   # "stop" (EOS or stop string) or "length" when it just ended
    tokens: int                 # completion tokens generated so far
    logprobs: tuple[TokenLogprob, ...] = ()  # entries released with this text (rows that asked)


class ServeEngine(PromptCodec):
    """A causal LM from a local HF directory, decoding rows in one batch on the CPU."""

    def __init__(self, checkpoint: str | Path, dtype: str = "float32",
                 trust_remote_code: bool = False) -> None:
        super().__init__(checkpoint, trust_remote_code)
        self.model = load_policy(checkpoint, dtype=getattr(torch, dtype),
                                 trust_remote_code=trust_remote_code).eval()

    # ---- decoding -------------------------------------------------------------
    @torch.no_grad()
    def steps(self, rows: Sequence[Row], dropped: Callable[[], Iterable[int]] = tuple
              ) -> Iterator[list[Delta | None]]:
        """Decode all rows together; yield one entry per row after each token (None once done).

        When a row echoes or has max_tokens 0, a first step (tokens=0) carries the
        echoed prompts and ends the max_tokens-0 rows; the other rows get empty deltas.
        `dropped()`: the rows nobody reads any more (their caller left); they stop decoding.
        """
        gens = [torch.Generator().manual_seed((secrets.randbits(63) if r.seed is None else r.seed)
                                              % 2**64) for r in rows]
        first = self._prompt_step(rows) if any(r.echo or r.max_tokens == 0 for r in rows) else None
        # An echoed prompt's text comes first: completion offsets count from its end.
        bases = [len(d.text) for d in first] if first else [0] * len(rows)
        texts = [RowText(self.tokenizer, r.stop, base=b) for r, b in zip(rows, bases)]
        if first:
            yield first
        live = [i for i, r in enumerate(rows) if r.max_tokens > 0]
        if not live:
            return
        decoding = Decoding(self.model, [rows[i].prompt_ids for i in live],
                            [rows[i].max_tokens for i in live], self.eos_id, self.pad_id,
                            temperature=[rows[i].temperature for i in live],
                            top_p=[rows[i].top_p for i in live], generators=[gens[i] for i in live],
                            top_logprobs=[rows[i].logprobs for i in live])
        for step in decoding:
            out: list[Delta | None] = [None] * len(rows)
            n, stopped = step.index + 1, []
            scored = {} if step.raw is None else dict(zip(step.raw_rows.tolist(), _scored(step.raw)))
            for j, tok in zip(step.rows.tolist(), step.tokens.tolist()):
                i, row = live[j], rows[live[j]]
                info = scored.get(j)
                if info is not None:
                    info = Scored(info.logprob, info.top[:row.logprobs])
                text, hit = texts[i].push(tok, info)
                if tok == self.eos_id:
                    reason, text = "stop", text + texts[i].flush()
                elif hit:
                    reason = "stop"
                    stopped.append(j)
                elif n >= row.max_tokens:
                    reason, text = "length", text + texts[i].flush()
                else:
                    reason = None
                out[i] = Delta(text, reason, n, texts[i].take_logprobs(done=reason is not None))
            gone = set(dropped())
            stopped += [j for j, i in enumerate(live) if i in gone]
            decoding.finish(stopped)  # EOS and max_tokens end rows in the core itself
            yield out

    def _prompt_step(self, rows: Sequence[Row]) -> list[Delta]:
        """The echoed prompts (with their logprobs where asked); max_tokens-0 rows end here."""
        # Each distinct prompt scored once (n choices share one), at the most alternatives any row asked.
        asking = [r for r in rows if r.echo and r.logprobs is not None]
        keys = list(dict.fromkeys(tuple(r.prompt_ids) for r in asking))
        k = max((r.logprobs for r in asking), default=0)
        raws = prompt_logprobs(self.model, keys, k, self.pad_id) if keys else []
        scores = {key: _scored(raw) for key, raw in zip(keys, raws)}
        offsets = {key: prefix_offsets(self.tokenizer, key) for key in keys}
        out = []
        for r in rows:
            reason = "length" if r.max_tokens == 0 else None
            if not r.echo:
                out.append(Delta("", reason, 0))
                continue
            ids = list(r.prompt_ids)
            entries: tuple[TokenLogprob, ...] = ()
            if r.logprobs is not None:
                key = tuple(ids)
                infos = [None] + [Scored(s.logprob, s.top[:r.logprobs]) for s in scores[key]]
                entries = tuple(TokenLogprob(t, info, o) for t, info, o in zip(ids, infos, offsets[key]))
            out.append(Delta(decode(self.tokenizer, ids), reason, 0, entries))
        return out


def _scored(raw: RawLogprobs) -> list[Scored]:
    """Tensors to Python once per step: each position's logprob and (token, logprob) alternatives."""
    return [Scored(lp, tuple(zip(ids, lps))) for lp, ids, lps in
            zip(raw.chosen.tolist(), raw.top_ids.tolist(), raw.top_logprobs.tolist())]


@dataclass
class _Job:
    """One caller's rows in a batch."""
    rows: list[Row]
    abandoned: bool = False  # the caller stopped reading


class BatchedEngine:
    """Requests arriving together (up to max_batch_size, within batch_wait_timeout_s) share a loop.

    Only usable inside a Ray Serve replica (`@serve.batch` needs the replica context).
    """

    def __init__(self, engine: ServeEngine, max_batch_size: int, batch_wait_timeout_s: float) -> None:
        self.engine = engine
        self._batch.set_max_batch_size(max_batch_size)
        self._batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    async def run(self, rows: list[Row]) -> AsyncIterator[list[Delta | None]]:
        """This request's rows, one list of deltas per decoding step."""
        job = _Job(rows)
        try:
            async for deltas in self._batch(job):
                yield deltas
        finally:  # also when the caller is cancelled (a client that disconnected)
            job.abandoned = True

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _batch(self, jobs: list[_Job]):
        flat = [row for job in jobs for row in job.rows]
        spans, start = [], 0
        for job in jobs:
            spans.append((start, start + len(job.rows)))
            start += len(job.rows)
        finished = [False] * len(jobs)

        # Serve runs a batch to its end even for callers that left, and the next batch waits
        # for it: their rows must stop decoding, or a few dropped streams stall the replica.
        def dropped() -> list[int]:
            return [i for job, (a, b) in zip(jobs, spans) if job.abandoned for i in range(a, b)]

        steps = self.engine.steps(flat, dropped)
        while True:
            # A thread, so the replica's event loop keeps accepting requests meanwhile.
            deltas = await asyncio.to_thread(next, steps, None)
            if deltas is None:
                return
            out = []
            for j, (a, b) in enumerate(spans):
                if finished[j]:
                    out.append(StopIteration)  # Serve's end-of-stream sentinel for this caller
                    continue
                part = deltas[a:b]
                out.append(part)
                finished[j] = all(d is None or d.finish_reason for d in part)
            yield out
