"""Typed batch containers: a dataclass of tensors that splits, concatenates and moves.

Every tensor field has the batch on dim 0. Non-tensor fields (ints, strings, lists of
per-row metadata) are carried along: lists are split/concatenated with the rows, and
scalars must agree when concatenating (e.g. the weight version a rollout was sampled
with). Subclasses only declare fields.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence, TypeVar

import torch

B = TypeVar("B", bound="TensorBatch")
T = TypeVar("T")


def even_bounds(n: int, parts: int) -> list[int]:
    """Boundaries of `parts` consecutive, nearly equal pieces of n rows (the one split rule)."""
    return [round(i * n / parts) for i in range(parts + 1)]


def split_evenly(items: Sequence[T], parts: int) -> list[list[T]]:
    bounds = even_bounds(len(items), parts)
    return [list(items[bounds[i]: bounds[i + 1]]) for i in range(parts)]


@dataclasses.dataclass
class TensorBatch:
    def __len__(self) -> int:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, (torch.Tensor, list)):
                return len(v)
        return 0

    def _rows(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def as_dict(self) -> dict:
        """Every field by name (plain types and tensors: a checkpoint loads it weights-only)."""
        return self._rows()

    def select(self: B, index: torch.Tensor | slice | Sequence[int]) -> B:
        """Rows by slice or index list/tensor, for every per-row field."""
        out = {}
        for name, v in self._rows().items():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                out[name] = v[index] if isinstance(index, slice) else v[torch.as_tensor(index, dtype=torch.long)]
            elif isinstance(v, list):
                out[name] = v[index] if isinstance(index, slice) else [v[int(i)] for i in index]
            else:
                out[name] = v
        return type(self)(**out)

    def split(self: B, size: int) -> list[B]:
        """Consecutive chunks of `size` rows (the last may be shorter)."""
        n = len(self)
        return [self.select(slice(i, min(i + size, n))) for i in range(0, n, size)]

    def chunk(self: B, parts: int) -> list[B]:
        """`parts` nearly equal consecutive chunks (for sharding over workers)."""
        bounds = even_bounds(len(self), parts)
        return [self.select(slice(bounds[i], bounds[i + 1])) for i in range(parts)]

    @classmethod
    def concat(cls: type[B], batches: Sequence[B]) -> B:
        if not batches:
            raise ValueError("concat of no batches")
        out = {}
        for f in dataclasses.fields(cls):
            vals = [getattr(b, f.name) for b in batches]
            first = vals[0]
            if isinstance(first, torch.Tensor) and first.dim() > 0:
                out[f.name] = _cat_padded(vals)
            elif isinstance(first, list):
                out[f.name] = [x for v in vals for x in v]
            else:
                if any(v != first for v in vals[1:]):
                    raise ValueError(f"cannot concat batches with different {f.name}: {vals}")
                out[f.name] = first
        return cls(**out)

    def to(self: B, device: torch.device | str) -> B:
        return dataclasses.replace(self, **{
            n: v.to(device) for n, v in self._rows().items() if isinstance(v, torch.Tensor)})

    def replace(self: B, **changes) -> B:
        return dataclasses.replace(self, **changes)


def _cat_padded(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate on dim 0, right-padding dim 1 with zeros when lengths differ."""
    if tensors[0].dim() == 1 or all(t.shape[1:] == tensors[0].shape[1:] for t in tensors):
        return torch.cat(list(tensors), dim=0)
    width = max(t.shape[1] for t in tensors)
    padded = [torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, width - t.shape[1]))
              for t in tensors]
    return torch.cat(padded, dim=0)
