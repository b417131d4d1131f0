"""Seeded, resumable data streams for PPO: prompts for rollouts, text blocks for ptx.

Each stream walks a fresh seeded permutation per pass over its data and records
its position, so a resumed run draws exactly the batches an uninterrupted one
would have.
"""
from __future__ import annotations

import random
from typing import Generic, Sequence, TypeVar

import torch

from rlhf.seeds import derive_seed

T = TypeVar("T")


class Stream(Generic[T]):
    def __init__(self, items: Sequence[T], seed: int):
        if not items:
            raise ValueError("empty stream")
        self.items, self.seed = items, seed
        self.epoch, self.pos = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        order = list(range(len(self.items)))
        random.Random(derive_seed(self.seed, self.epoch)).shuffle(order)
        return order

    def take(self, n: int) -> list[T]:
        out = []
        while len(out) < n:
            if self.pos == len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._permutation()
            take = min(n - len(out), len(self._order) - self.pos)
            out += [self.items[i] for i in self._order[self.pos: self.pos + take]]
            self.pos += take
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed, "n": len(self.items)}

    def load_state_dict(self, state: dict) -> None:
        if state["n"] != len(self.items) or state["seed"] != self.seed:
            raise ValueError(f"stream state is for {state['n']} items / seed {state['seed']}, "
                             f"not {len(self.items)} / {self.seed}")
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._order = self._permutation()


class BlockStream(Stream[int]):
    """Rows of a [N, L] tensor of packed pretraining text, drawn like a Stream."""

    def __init__(self, blocks: torch.Tensor, seed: int):
        self.blocks = blocks
        super().__init__(range(blocks.shape[0]), seed)

    def take_blocks(self, n: int) -> torch.Tensor:
        return self.blocks[torch.tensor(self.take(n), dtype=torch.long)]
