"""The model side of the HF endpoint: a Serve deployment whose replicas decode rows in batches.

The replicas hold the weights; the HTTP front (`app.OpenAIServer`) checks and encodes each
request and calls them through a handle, so a request that a dying replica had taken is
sent again to another one instead of failing.
"""
from __future__ import annotations

from typing import AsyncIterator

import torch
from ray import serve

from orchestration.serve.engine import BatchedEngine, Delta, Row, ServeEngine


@serve.deployment(name="decoder")  # replicas and admission: app.build_app, from ServeConfig
class Decoder:
    def __init__(self, checkpoint: str, max_batch_size: int, batch_wait_timeout_s: float,
                 num_threads: int = 1, dtype: str = "float32") -> None:
        torch.set_num_threads(num_threads)
        self.batcher = BatchedEngine(ServeEngine(checkpoint, dtype=dtype), max_batch_size, batch_wait_timeout_s)

    async def generate(self, rows: list[Row]) -> AsyncIterator[list[Delta | None]]:
        """The rows' deltas after each decoding step, batched with other callers' rows."""
        async for deltas in self.batcher.run(rows):
            yield deltas

    async def complete(self, rows: list[Row]) -> tuple[list[str], list[str | None], list[list], list[int]]:
        """Each row's whole answer: (texts, finish reasons, logprob entries, completion tokens)."""
        texts, reasons, tokens = [""] * len(rows), [None] * len(rows), [0] * len(rows)
        entries: list[list] = [[] for _ in rows]
        async for deltas in self.batcher.run(rows):
            for i, d in enumerate(deltas):
                if d is not None:
                    texts[i] += d.text
                    tokens[i] = d.tokens
                    reasons[i] = d.finish_reason or reasons[i]
                    entries[i] += d.logprobs
        return texts, reasons, entries, tokens
