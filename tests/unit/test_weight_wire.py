"""Weights on the wire: WireBuffers cross pickle-5 (Ray's format) out-of-band and bit-exact."""
import pickle

import torch

from actors.weight_sync import WireBuffer, checksum, pack_buckets, resolve_buckets, unpack_buckets


def _named():
    g = torch.Generator().manual_seed(0)
    return {"a.w": torch.randn(40, 8, generator=g), "a.b": torch.randn(8, generator=g).to(torch.bfloat16),
            "n": torch.tensor([3, 1, 4], dtype=torch.int64), "h": torch.randn(5, generator=g).half()}


def test_buffers_travel_out_of_band_and_arrive_bit_exact():
    named = _named()
    buffers, metas = pack_buckets(named)
    wire = [WireBuffer.of(b) for b in buffers]
    out_of_band = []
    blob = pickle.dumps(wire, protocol=5, buffer_callback=out_of_band.append)
    # every byte of every bucket went out of band (no copy into the pickle stream)
    assert len(out_of_band) == len(buffers)
    assert sum(memoryview(b).nbytes for b in out_of_band) == sum(b.numel() * b.element_size() for b in buffers)
    assert len(blob) < 1000
    received = pickle.loads(blob, buffers=out_of_band)
    tensors, immutable = resolve_buckets(received)
    assert not immutable  # writable memory someone else may change: a reader must copy it
    for got, sent in zip(tensors, buffers):
        assert got.dtype == sent.dtype and torch.equal(got, sent)
    assert checksum(unpack_buckets(tensors, metas)) == checksum(named)


def test_a_wire_tensor_shares_the_received_memory():
    buf = torch.arange(10, dtype=torch.float32)
    wire = WireBuffer.of(buf)
    t = wire.tensor()
    assert t.data_ptr() == wire.data.ctypes.data  # a view, not a copy
    assert torch.equal(t, buf)


def test_only_read_only_received_memory_counts_as_an_immutable_snapshot():
    buffers, _ = pack_buckets(_named())
    out_of_band = []
    blob = pickle.dumps([WireBuffer.of(b) for b in buffers], protocol=5, buffer_callback=out_of_band.append)
    # Ray hands readers read-only views of object-store memory; bytes stand in for it here
    read_only = pickle.loads(blob, buffers=[bytes(memoryview(b)) for b in out_of_band])
    tensors, immutable = resolve_buckets(read_only)
    assert immutable and all(torch.equal(t, b) for t, b in zip(tensors, buffers))
    assert resolve_buckets(read_only + [buffers[0]])[1] is False  # one live tensor: copy them all
