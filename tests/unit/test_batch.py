"""TensorBatch: split/chunk/concat round-trip row for row, including ragged widths."""
import dataclasses

import pytest
import torch

from rlhf.batch import TensorBatch


@dataclasses.dataclass
class Toy(TensorBatch):
    ids: torch.Tensor
    mask: torch.Tensor
    score: torch.Tensor
    names: list
    version: int


def toy(n, width, version=0, start=0):
    ids = torch.arange(start, start + n * width).reshape(n, width)
    return Toy(ids, torch.ones(n, width), torch.arange(n, dtype=torch.float) + start,
               [f"r{start + i}" for i in range(n)], version)


def test_split_then_concat_is_identity():
    b = toy(10, 4)
    parts = b.split(3)
    assert [len(p) for p in parts] == [3, 3, 3, 1]
    back = Toy.concat(parts)
    assert torch.equal(back.ids, b.ids) and back.names == b.names and back.version == 0


def test_chunk_balances_rows():
    parts = toy(10, 2).chunk(4)
    sizes = [len(p) for p in parts]
    assert sum(sizes) == 10 and max(sizes) - min(sizes) <= 1
    assert [n for p in parts for n in p.names] == [f"r{i}" for i in range(10)]


def test_select_by_index_keeps_rows_aligned():
    b = toy(5, 3)
    s = b.select([4, 0])
    assert s.names == ["r4", "r0"] and torch.equal(s.ids[0], b.ids[4]) and s.score.tolist() == [4.0, 0.0]


def test_concat_right_pads_ragged_rows_with_zeros():
    a, c = toy(2, 3), toy(1, 5, start=100)
    out = Toy.concat([a, c])
    assert out.ids.shape == (3, 5)
    assert out.mask[:2, 3:].sum() == 0 and out.mask[2].sum() == 5
    assert torch.equal(out.ids[2], c.ids[0])


def test_concat_refuses_mixed_scalar_metadata():
    with pytest.raises(ValueError, match="version"):
        Toy.concat([toy(1, 2, version=1), toy(1, 2, version=2)])
