"""PPO data streams: every item once per pass, and a restored stream continues identically."""
import torch

from orchestration.ppo.streams import BlockStream, Stream


def test_each_pass_covers_every_item_once_in_a_new_order():
    s = Stream(list(range(10)), seed=1)
    first, second = s.take(10), s.take(10)
    assert sorted(first) == sorted(second) == list(range(10))
    assert first != second


def test_restored_stream_continues_exactly():
    a = Stream(list("abcdefg"), seed=3)
    a.take(5)
    state = a.state_dict()
    expected = a.take(12)
    b = Stream(list("abcdefg"), seed=3)
    b.load_state_dict(state)
    assert b.take(12) == expected


def test_block_stream_returns_rows():
    blocks = torch.arange(20).view(5, 4)
    rows = BlockStream(blocks, seed=0).take_blocks(7)
    assert rows.shape == (7, 4)
    assert all(any(torch.equal(r, b) for b in blocks) for r in rows)
