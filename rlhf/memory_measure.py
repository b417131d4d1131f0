"""Peak tensor memory of a piece of CPU code, measured (there is no max_memory_allocated on CPU).

Two independent readings, added:
- the bytes alive when the code starts: every distinct tensor storage the garbage
  collector can reach (parameters, optimizer state, EMA shadows, buffers);
- the most the code adds on top: torch.profiler's memory events, which the CPU
  allocator reports for every allocation and free (`profile_memory=True`), summed
  in time order. Tensors made and dropped inside C++ (autograd's saved tensors,
  kernel temporaries) are counted too, since each goes through the allocator.

Storage that does not come from the allocator (a memory-mapped file) is missing from
the second reading; the first counts it at its size. The helper is checked against
tensors of known size in tests/unit/test_memory_plan.py.
"""
from __future__ import annotations

import gc
import warnings
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
from torch.profiler import ProfilerActivity, profile

T = TypeVar("T")


@dataclass(frozen=True)
class PeakMemory:
    baseline: int   # bytes of tensor storage alive before the code ran
    growth: int     # the most the code's allocations raised that, at any moment
    end: int        # what the code left allocated (growth at its end)

    @property
    def peak(self) -> int:
        return self.baseline + self.growth


def live_tensor_bytes() -> int:
    """Bytes of every distinct storage of the tensors the garbage collector tracks."""
    gc.collect()
    seen: dict[int, int] = {}
    with warnings.catch_warnings():  # isinstance() on deprecated module attributes warns
        warnings.simplefilter("ignore")
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for t in tensors:
        try:
            if t.device.type != "cpu":
                continue
            st = t.untyped_storage()
            ptr, size = st.data_ptr(), st.nbytes()
        except (RuntimeError, NotImplementedError):  # meta, freed and other storage-less tensors
            continue
        if size:
            seen[ptr] = max(seen.get(ptr, 0), size)
    return sum(seen.values())


def measure_peak(fn: Callable[[], T]) -> tuple[T, PeakMemory]:
    """Run `fn` once; return its result and the peak tensor memory while it ran."""
    baseline = live_tensor_bytes()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
                     and e.device_type() == torch.autograd.DeviceType.CPU), key=lambda e: e.start_ns())
    now = top = 0
    for e in events:
        now += e.nbytes()
        top = max(top, now)
    return result, PeakMemory(baseline, top, now)
