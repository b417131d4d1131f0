"""Bucketed weight transport between the policy learner and the generators.

Parameters are packed into a handful of flat 1-D buffers, one dtype per buffer,
each at most `cap_bytes` (a single tensor larger than the cap gets a buffer of
its own). Sending a few big buffers instead of one message per parameter is the
point: per-call overhead, not bandwidth, dominates naive weight sync.

CPU transport: learner rank 0 `ray.put`s each buffer once (`put_buckets`) and the
driver passes the same refs to every generator, which unpacks them by name. A
buffer travels as a numpy array (`WireBuffer`), which Ray stores out-of-band: one
copy into the object store on put, and every reader gets a zero-copy view of the
shared memory (a torch tensor would be pickled, i.e. copied, on both sides).
That put is the only copy a sync makes: a CPU learner's parameters live in the
buffers (`FlatParameters`), and a CPU generator points its parameters at the
read-only snapshot (`load_weights(borrow=True)`) instead of copying it.

`checksum` is exact: a 128-bit XXH3 over every tensor's name, dtype, shape and raw
bytes in name order, so equal checksums <=> bit-identical weights (up to hash
collisions; the check guards against transport and loading faults, not an
adversary). XXH3 runs at ~6.5 GB/s on one core here, blake2b at ~0.6 GB/s: with
blake2b, verifying a sync cost several times the transfer itself.
(`xxhash` is a dependency of `datasets`.)
"""
from __future__ import annotations

import dataclasses
import sys
import warnings
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
import xxhash

DEFAULT_CAP_BYTES = 64 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where one named tensor lives inside a flat buffer."""
    name: str
    shape: tuple[int, ...]
    offset: int
    numel: int


@dataclasses.dataclass(frozen=True)
class BucketMeta:
    """Layout of one flat buffer: its dtype, length and the tensors in it."""
    dtype: str
    numel: int
    slots: tuple[Slot, ...]


NamedTensors = Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]


def _items(named: NamedTensors) -> list[tuple[str, torch.Tensor]]:
    items = list(named.items()) if isinstance(named, Mapping) else list(named)
    names = [n for n, _ in items]
    if len(set(names)) != len(names):
        raise ValueError("duplicate tensor names")
    return items


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def plan_buckets(named: NamedTensors, cap_bytes: int = DEFAULT_CAP_BYTES) -> list[BucketMeta]:
    """Group tensors by dtype (first-seen order), then fill buffers greedily up to the cap."""
    if cap_bytes <= 0:
        raise ValueError(f"cap_bytes must be positive, got {cap_bytes}")
    by_dtype: dict[torch.dtype, list[tuple[str, torch.Tensor]]] = {}
    for name, t in _items(named):
        by_dtype.setdefault(t.dtype, []).append((name, t))
    metas: list[BucketMeta] = []
    for dtype, items in by_dtype.items():
        size = torch.empty((), dtype=dtype).element_size()
        slots: list[Slot] = []
        filled = 0
        for name, t in items:
            n = t.numel()
            if slots and (filled + n) * size > cap_bytes:
                metas.append(BucketMeta(_dtype_name(dtype), filled, tuple(slots)))
                slots, filled = [], 0
            slots.append(Slot(name, tuple(t.shape), filled, n))
            filled += n
        if slots:
            metas.append(BucketMeta(_dtype_name(dtype), filled, tuple(slots)))
    return metas


def pack_into(buffers: Sequence[torch.Tensor], metas: Sequence[BucketMeta], named: NamedTensors) -> None:
    """Copy tensors into existing buffers laid out by `metas` (reused across steps)."""
    tensors = dict(_items(named))
    for buf, meta in zip(buffers, metas, strict=True):
        for s in meta.slots:
            buf[s.offset: s.offset + s.numel].copy_(tensors[s.name].detach().reshape(-1))


def pack_buckets(named: NamedTensors, cap_bytes: int = DEFAULT_CAP_BYTES
                 ) -> tuple[list[torch.Tensor], list[BucketMeta]]:
    """(flat buffers, their layout); buffers are on the tensors' device."""
    items = _items(named)
    metas = plan_buckets(items, cap_bytes)
    device = items[0][1].device if items else torch.device("cpu")
    buffers = [torch.empty(m.numel, dtype=getattr(torch, m.dtype), device=device) for m in metas]
    pack_into(buffers, metas, items)
    return buffers, metas


def gathered_buckets(named: NamedTensors, metas: Sequence[BucketMeta]
                     ) -> Iterable[tuple[torch.Tensor, BucketMeta]]:
    """Buckets of whole tensors from sharded ones (FSDP2 DTensors), one bucket at a time.

    Each tensor is gathered (a collective: every rank iterates alike), copied into the
    bucket's CPU buffer and dropped, so beyond its shard a rank holds one bucket and
    one gathered tensor at a time.
    """
    from rlhf.sharding import full

    tensors = dict(_items(named))
    for meta in metas:
        buf = torch.empty(meta.numel, dtype=getattr(torch, meta.dtype))
        for s in meta.slots:
            whole = full(tensors[s.name].detach())
            buf[s.offset: s.offset + s.numel].copy_(whole.reshape(-1))
            del whole
        yield buf, meta
        del buf  # before the next bucket is allocated: one alive at a time


class StagingBuffers:
    """Flat CPU buffers that every sync packs into in place.

    Fresh buffers per sync cost more than the copy itself: first-touch page faults
    on 400 MB took 0.34-0.48 s here, packing into already-mapped buffers 0.05 s.
    They are reallocated only when the layout changes.
    """

    def __init__(self, cap_bytes: int = DEFAULT_CAP_BYTES) -> None:
        self.cap_bytes = cap_bytes
        self.metas: list[BucketMeta] = []
        self.buffers: list[torch.Tensor] = []

    def pack(self, named: NamedTensors) -> tuple[list[torch.Tensor], list[BucketMeta]]:
        items = _items(named)
        metas = plan_buckets(items, self.cap_bytes)
        if metas != self.metas:
            self.buffers = [torch.empty(m.numel, dtype=getattr(torch, m.dtype)) for m in metas]
            self.metas = metas
        pack_into(self.buffers, metas, items)
        return self.buffers, metas


class FlatParameters:
    """A module's parameters moved into flat CPU buffers, so publishing copies nothing.

    Each parameter's `.data` becomes a view of its slot (`plan_buckets` layout), so
    an optimizer step writes the buffers in place and `ray.put` can take them as they
    are. Packing a 100M-parameter policy into separate staging buffers was one more
    full copy per sync (0.05 s of the 0.13 s publish). Build it before the optimizer,
    and keep later loads in place (`load_state_dict` copies into the views).
    """

    def __init__(self, module: torch.nn.Module, cap_bytes: int | None = None) -> None:
        named = list(module.named_parameters())
        if any(p.device.type != "cpu" for _, p in named):
            raise ValueError("FlatParameters holds CPU parameters only")
        # Default: one buffer per dtype. `ray.put` copies one large object faster than
        # several pieces of it (400 MB here: 0.027 s as one object, 0.045 s as 7 x 64 MB).
        self.metas = plan_buckets(named, cap_bytes or sys.maxsize)
        self.buffers = [torch.empty(m.numel, dtype=getattr(torch, m.dtype)) for m in self.metas]
        pack_into(self.buffers, self.metas, named)
        views = unpack_buckets(self.buffers, self.metas)
        for name, p in named:
            p.data = views[name]
        self._pointers = {name: views[name].data_ptr() for name, _ in named}

    def buckets(self, module: torch.nn.Module) -> tuple[list[torch.Tensor], list[BucketMeta]]:
        """The buffers, after checking every parameter of `module` still lives in its slot."""
        moved = [n for n, p in module.named_parameters() if self._pointers.get(n) != p.data_ptr()]
        if moved or len(self._pointers) != len(list(module.parameters())):
            raise RuntimeError(f"parameters no longer in their flat buffers: {moved[:5]} "
                               "(replaced rather than copied into?)")
        return self.buffers, self.metas


def unpack_buckets(buffers: Sequence[torch.Tensor], metas: Sequence[BucketMeta]) -> dict[str, torch.Tensor]:
    """Named views into the buffers (no copies); checks the layout matches."""
    out: dict[str, torch.Tensor] = {}
    for buf, meta in zip(buffers, metas, strict=True):
        if buf.dim() != 1 or buf.numel() != meta.numel or _dtype_name(buf.dtype) != meta.dtype:
            raise ValueError(f"buffer {tuple(buf.shape)} {buf.dtype} does not match its layout "
                             f"({meta.numel} x {meta.dtype})")
        for s in meta.slots:
            out[s.name] = buf[s.offset: s.offset + s.numel].view(s.shape)
    return out


def checksum(named: NamedTensors) -> str:
    """Exact fingerprint of named tensors: XXH3-128 over names, dtypes, shapes and bytes."""
    return _digest(sorted(_items(named), key=lambda kv: kv[0]))


def module_checksum(module: torch.nn.Module) -> str:
    """`checksum` of a module's whole parameters, gathered one at a time in name order when
    sharded (a collective), so a rank never holds more than one whole tensor for it."""
    from rlhf.sharding import full

    params = dict(module.named_parameters())
    return _digest((name, full(params[name].detach())) for name in sorted(params))


def _digest(items: Iterable[tuple[str, torch.Tensor]]) -> str:
    h = xxhash.xxh3_128()
    for name, t in items:
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{_dtype_name(t.dtype)}|{tuple(t.shape)}|".encode())
        # A uint8 view reads the raw bytes of any dtype (bfloat16 included), without a copy.
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class WireBuffer:
    """A flat buffer as Ray ships it: raw bytes as numpy (zero-copy to read) and its dtype."""
    dtype: str
    data: np.ndarray  # uint8

    @classmethod
    def of(cls, buffer: torch.Tensor) -> "WireBuffer":
        flat = buffer.detach().to("cpu").contiguous().reshape(-1)
        return cls(_dtype_name(flat.dtype), flat.view(torch.uint8).numpy())

    @property
    def immutable(self) -> bool:
        """True for an object-store snapshot: nobody can change these bytes, so a reader may
        keep using them in place rather than copy them."""
        return not self.data.flags.writeable

    def tensor(self) -> torch.Tensor:
        """The buffer as a tensor over the same memory (read-only when it is the object store's)."""
        with warnings.catch_warnings():
            # Object-store arrays are read-only; the tensor is only ever read.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(self.data).view(getattr(torch, self.dtype))


def put_buckets(buffers: Sequence[torch.Tensor]) -> list:
    """CPU transport: each buffer into the Ray object store once; returns the refs."""
    import ray  # lazily: the packing helpers above are usable without Ray

    return [ray.put(WireBuffer.of(b)) for b in buffers]


def resolve_buckets(buckets: Sequence) -> tuple[list[torch.Tensor], bool]:
    """Buffers given as tensors, WireBuffers or ObjectRefs to either (Ray resolves
    top-level arguments itself, so an actor method usually receives WireBuffers).

    Returns the tensors and whether all of them are immutable object-store snapshots,
    which a generator may then use in place (`load_weights(..., borrow=True)`); a plain
    tensor may be someone's live buffer and must be copied.
    """
    import ray

    out = list(buckets)
    refs = [i for i, b in enumerate(out) if isinstance(b, ray.ObjectRef)]
    if refs:
        for i, value in zip(refs, ray.get([out[i] for i in refs])):
            out[i] = value
    immutable = all(isinstance(b, WireBuffer) and b.immutable for b in out)
    return [b.tensor() if isinstance(b, WireBuffer) else b for b in out], immutable
