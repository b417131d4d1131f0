"""Bucketed weight packing: exact round trip, few buckets, an exact checksum."""
import math

import pytest
import torch

from actors.weight_sync import (FlatParameters, StagingBuffers, checksum, pack_buckets, plan_buckets,
                                unpack_buckets)


def _named():
    g = torch.Generator().manual_seed(0)
    return {
        "emb.weight": torch.randn(50, 16, generator=g),
        "ln.weight": torch.randn(16, generator=g).to(torch.bfloat16),
        "h.0.w": torch.randn(16, 48, generator=g),
        "h.0.b": torch.randn(48, generator=g).to(torch.float16),
        "h.1.w": torch.randn(48, 16, generator=g).to(torch.bfloat16),
        "step": torch.tensor(7, dtype=torch.int64),
        "head.t": torch.randn(16, 50, generator=g).t(),  # non-contiguous source
    }


@pytest.mark.parametrize("cap_bytes", [64, 1000, 4096, 1 << 26])
def test_round_trip_is_bit_exact_across_dtypes(cap_bytes):
    named = _named()
    buffers, metas = pack_buckets(named, cap_bytes)
    assert all(b.dim() == 1 for b in buffers)
    out = unpack_buckets(buffers, metas)
    assert set(out) == set(named)
    for name, t in named.items():
        assert out[name].dtype == t.dtype and out[name].shape == t.shape
        assert torch.equal(out[name], t)


def test_each_bucket_holds_one_dtype_and_respects_the_cap():
    named = _named()
    cap = 1000
    buffers, metas = pack_buckets(named, cap)
    for buf, meta in zip(buffers, metas):
        names = [s.name for s in meta.slots]
        assert {named[n].dtype for n in names} == {buf.dtype}
        # only a lone tensor that is itself over the cap may exceed it
        if buf.numel() * buf.element_size() > cap:
            assert len(names) == 1


def test_bucket_count_is_bounded_by_bytes_over_cap():
    # 200 small tensors of one dtype: greedy filling must not give one bucket each.
    named = {f"p{i}": torch.ones(10) for i in range(200)}  # 40 bytes each, 8000 in all
    metas = plan_buckets(named, cap_bytes=1000)
    assert len(metas) == math.ceil(8000 / 1000)
    assert len(plan_buckets(named, cap_bytes=1 << 20)) == 1
    # one bucket per dtype when everything fits
    assert len(plan_buckets(_named(), cap_bytes=1 << 26)) == 4


def test_unpack_refuses_a_mismatched_layout():
    buffers, metas = pack_buckets(_named(), 1 << 26)
    with pytest.raises(ValueError):
        unpack_buckets([b[:-1] for b in buffers], metas)


def test_checksum_is_exact():
    named = _named()
    base = checksum(named)
    assert checksum(dict(reversed(list(named.items())))) == base  # order of arrival is irrelevant
    assert checksum({k: v.clone() for k, v in named.items()}) == base
    buffers, metas = pack_buckets(named, 1000)
    assert checksum(unpack_buckets(buffers, metas)) == base
    for name in ("emb.weight", "ln.weight", "h.0.b"):
        changed = {k: v.clone() for k, v in named.items()}
        flat = changed[name].view(-1)
        # the smallest possible change: the next representable value of one element
        flat[3] = torch.nextafter(flat[3], torch.tensor(math.inf, dtype=flat.dtype))
        assert checksum(changed) != base
    renamed = dict(named)
    renamed["emb.weight2"] = renamed.pop("emb.weight")
    assert checksum(renamed) != base
    cast = dict(named)
    cast["emb.weight"] = named["emb.weight"].double()
    assert checksum(cast) != base


def test_staging_buffers_are_reused_and_follow_the_weights():
    named = _named()
    staging = StagingBuffers(1 << 12)
    first, metas = staging.pack(named)
    pointers = [b.data_ptr() for b in first]
    for t in named.values():
        t.add_(1)
    again, metas_again = staging.pack(named)
    assert [b.data_ptr() for b in again] == pointers and metas_again == metas  # no reallocation
    assert checksum(unpack_buckets(again, metas)) == checksum(named)  # the new values, not the old
    fewer = dict(list(named.items())[1:])
    buffers, metas = staging.pack(fewer)  # another layout: new buffers that fit it
    assert checksum(unpack_buckets(buffers, metas)) == checksum(fewer)


class _Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 16)
        self.mid = torch.nn.Linear(16, 16)
        self.head = torch.nn.Linear(16, 50, bias=False)
        self.head.weight = self.emb.weight  # tied, as GPT-2's lm_head

    def forward(self, ids):
        return self.head(torch.tanh(self.mid(self.emb(ids))))


def test_flat_parameters_are_the_buffers_an_optimizer_step_writes():
    torch.manual_seed(0)
    model = _Tied()
    before = checksum(model.named_parameters())
    flat = FlatParameters(model, cap_bytes=2048)  # several buckets
    assert checksum(model.named_parameters()) == before  # moving changed no value
    buffers, metas = flat.buckets(model)
    assert len(buffers) > 1 and model.head.weight is model.emb.weight
    spans = [(b.data_ptr(), b.data_ptr() + b.numel() * b.element_size()) for b in buffers]
    for _, p in model.named_parameters():
        assert any(lo <= p.data_ptr() < hi for lo, hi in spans)  # a view, not a copy
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.arange(10)).sum().backward()
    opt.step()
    assert checksum(model.named_parameters()) != before
    assert checksum(unpack_buckets(buffers, metas)) == checksum(model.named_parameters())
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})  # copies in place
    flat.buckets(model)
    model.mid.weight.data = model.mid.weight.data.clone()  # replaced: the buffers would go stale
    with pytest.raises(RuntimeError, match="mid.weight"):
        flat.buckets(model)
