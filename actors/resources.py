"""Per-actor resources: thread count matched to the actor's CPU share, device choice.

On 2 cores, eight actors each running torch with its default thread pool would
oversubscribe the machine many times over; every actor calls `configure_threads`
first so its intra-op pool matches the `num_cpus` Ray granted it (at least 1).
"""
from __future__ import annotations

import math
import os

import torch

import rlhf


def assigned_cpus() -> float | None:
    """The CPU share Ray granted the current actor; None outside a Ray worker."""
    import ray

    if not ray.is_initialized():
        return None
    ctx = ray.get_runtime_context()
    if ctx.worker.mode != ray.WORKER_MODE:
        return None
    return float(ctx.get_assigned_resources().get("CPU", 0.0))


def threads_for(num_cpus: float | None) -> int:
    """Threads for a CPU share: its whole cores, at least one."""
    return max(1, math.floor(num_cpus)) if num_cpus else 1


def configure_threads(num_threads: int | None = None) -> int:
    """Set torch's thread pools for this process; None = derive from Ray's grant."""
    n = min(num_threads if num_threads else threads_for(assigned_cpus()), os.cpu_count() or 1)
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # only settable before the first inter-op work; harmless if already set
    return n


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """"auto" = the actor's first visible GPU if Ray gave it one, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but no CUDA device is visible to this actor")
    return dev


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """"bfloat16" -> torch.bfloat16; None stays None (the checkpoint's own dtype)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return value


# Several actors' thread pools share the cores while scoring and learning. OpenMP threads
# that spin while they wait steal the cores the others compute on; passive ones sleep.
# Read when the process loads OpenMP, so it goes in the actor's environment, not in
# configure_threads (bench/ppo_iteration.py, tiny: 4.62 -> 3.80 s per iteration).
# With rlhf.WORKER_ENV: rlhf/__init__.py skips an import no worker of ours uses.
WORKER_ENV = {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")} | rlhf.WORKER_ENV


def actor_class(cls: type, num_cpus: float = 1.0, num_gpus: float = 0.0, **options):
    """`ray.remote(cls)` with its resources, ready for `.remote(...)`.

    Fractional `num_cpus` (e.g. 0.25) lets many small actors share 2 cores.
    """
    import ray

    env = dict(options.pop("runtime_env", None) or {})
    env["env_vars"] = WORKER_ENV | env.get("env_vars", {})  # merged with the job's by Ray
    return ray.remote(cls).options(num_cpus=num_cpus, num_gpus=num_gpus, runtime_env=env, **options)
