"""How a learner holds and trains its model: strategy, compute dtype, activation checkpointing.

Every trainer (the PPO policy and critic groups, the Ray Train stages 0-2) prepares
its model here, so one config (`resources.strategy`, `model.dtype`,
`resources.activation_checkpointing`) means the same thing everywhere:

- "ddp": every rank holds a full float32 replica; gradients are averaged after backward.
- "fsdp": FSDP2 `fully_shard` on every transformer block and the root; each rank
  holds 1/N of the float32 weights, gradients and Adam state, and gathers a block's
  full weights only while it runs. Gradients come out of backward already averaged.
- 16-bit `model.dtype`: the float32 weights stay the master copy Adam updates; the
  forward and backward compute in bf16/fp16 (FSDP2's MixedPrecisionPolicy with float32
  gradient reduction, autocast under DDP); fp16 scales the loss (`LossScaler`).
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True)
class TrainLayout:
    """The three settings, as the config spells them."""
    strategy: str = "ddp"
    dtype: str = "float32"
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        compute_dtype(self.dtype)

    @classmethod
    def of(cls, cfg) -> "TrainLayout":
        """From a `rlhf.config.Config` (duck-typed: this module needs torch only)."""
        return cls(cfg.resources.strategy, cfg.model.dtype, cfg.resources.activation_checkpointing)

    @property
    def compute(self) -> torch.dtype:
        return compute_dtype(self.dtype)

    @property
    def master(self) -> torch.dtype:
        """The dtype of the weights Adam updates (float64 only for tests' exact comparisons)."""
        return torch.float64 if self.compute == torch.float64 else torch.float32

    @property
    def mixed(self) -> bool:
        return self.compute != self.master

    @property
    def sharded(self) -> bool:
        return self.strategy == "fsdp"


def compute_dtype(name: str) -> torch.dtype:
    # float64 is not a config choice; tests use it where a comparison must hold to 1e-9.
    value = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
             "float64": torch.float64}.get(name)
    if value is None:
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {name!r}")
    return value


# ---------------------------------------------------------------- the model's blocks

def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of every HF model inside `model` (its `_no_split_modules` classes)."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"{type(model).__name__}: no transformer blocks found "
                         "(the HF model declares none in _no_split_modules)")
    return blocks


def checkpoint_activations(model: nn.Module) -> int:
    """Recompute each block's activations in backward instead of storing them.

    The block's own forward is wrapped (not the module), so parameter names, state
    dicts and FSDP's hooks on the block stay as they are. Works in eval mode too:
    the PPO learners train without dropout, where HF's own switch does nothing.
    Returns the number of blocks wrapped.
    """
    blocks = transformer_blocks(model)
    for block in blocks:
        if getattr(block, "_instructray_checkpointed", False):
            continue
        inner = block.forward

        @functools.wraps(inner)
        def forward(*args, _inner=inner, **kwargs):
            if not torch.is_grad_enabled():
                return _inner(*args, **kwargs)
            args, kwargs = _without_cache(args, kwargs)
            return torch.utils.checkpoint.checkpoint(_inner, *args, use_reentrant=False, **kwargs)
        block.forward = forward
        block._instructray_checkpointed = True
    return len(blocks)


def _without_cache(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A checkpointed block must not write a KV cache: the recompute in backward would
    append the same keys again (HF's own checkpointing drops it the same way). HF
    models make a cache in every forward whose `use_cache` (default: the config's) is on,
    and GPT-2 hands it to its blocks positionally."""
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # no transformers: no HF cache to drop
        return args, kwargs
    args = tuple(None if isinstance(a, Cache) else a for a in args)
    kwargs = {k: None if isinstance(v, Cache) else v for k, v in kwargs.items()}
    if kwargs.get("use_cache"):
        kwargs["use_cache"] = False
    return args, kwargs


# ---------------------------------------------------------------- preparing a model

def prepare(model: nn.Module, layout: TrainLayout, device: torch.device, world_size: int) -> nn.Module:
    """The model as this rank trains it: float32 master weights on `device`, activation
    checkpointing if asked, FSDP2-sharded over the default process group under "fsdp".

    Under "ddp" the module is returned unwrapped: the caller averages gradients itself
    (the PPO learners' buckets) or wraps it in DistributedDataParallel (the stages).
    """
    model = model.to(device=device, dtype=layout.master)
    if layout.activation_checkpointing:
        checkpoint_activations(model)
    if layout.sharded:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        _shard(model, device, world_size, MixedPrecisionPolicy(param_dtype=layout.compute, reduce_dtype=torch.float32)
               if layout.mixed else MixedPrecisionPolicy())
    return model


def shard_frozen(model: nn.Module, device: torch.device, world_size: int) -> nn.Module:
    """A frozen model (a scorer) sharded over the default group for no-grad forwards: FSDP2
    per block and root, weights kept in the dtype they were loaded in (no master copy)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    model.requires_grad_(False)
    return _shard(model.to(device), device, world_size, MixedPrecisionPolicy())


def _shard(model: nn.Module, device: torch.device, world_size: int, policy) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world_size,))
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def compute_context(layout: TrainLayout, device: torch.device):
    """Where forwards run: autocast for 16-bit DDP; FSDP2 casts the weights itself."""
    if layout.mixed and not layout.sharded:
        return torch.autocast(device_type=device.type, dtype=layout.compute)
    return contextlib.nullcontext()


def is_sharded(model: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a (possibly sharded) tensor."""
    return t.to_local() if isinstance(t, DTensor) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor; a collective for a sharded one (every rank must call it)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def full_named_tensors(named: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, whole tensor) one at a time: at most one gathered tensor is alive per step
    when the caller drops each before asking for the next. Collective under FSDP."""
    for name, t in named:
        yield name, full(t.detach())


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's whole state on rank 0's CPU; other ranks get {} (a collective under FSDP,
    where every rank gathers each tensor but only rank 0 keeps it)."""
    return gather_to_rank0(iter(model.state_dict().items()))


def gather_to_rank0(named: Iterator[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Whole CPU copies of named (possibly sharded) tensors on rank 0, {} elsewhere."""
    main = not dist.is_initialized() or dist.get_rank() == 0
    out = {}
    for name, t in full_named_tensors(named):
        if main:
            out[name] = t.cpu()
        del t
    return out


def all_sum(value: float, device: torch.device) -> float:
    """Sum of a float over the default group (itself outside one)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t)


# ---------------------------------------------------------------- fp16 loss scaling

class LossScaler:
    """Dynamic loss scaling for fp16 compute (a constant 1 otherwise).

    The loss is multiplied by `scale` before backward so small fp16 gradients do not
    flush to zero; the optimizer sees gradients divided by it again. A step whose
    gradients overflowed is skipped and the scale halved; after `growth_interval`
    good steps in a row it doubles.
    """

    def __init__(self, enabled: bool, init_scale: float = 2.0 ** 16, growth_interval: int = 2000) -> None:
        self.enabled = enabled
        self.scale = float(init_scale) if enabled else 1.0
        self.growth_interval = growth_interval
        self.good_steps = 0

    @classmethod
    def for_dtype(cls, compute: torch.dtype) -> "LossScaler":
        """Scaling only where it is needed: fp16 compute."""
        return cls(compute == torch.float16)

    def scaled(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to call backward on."""
        return loss * self.scale if self.enabled else loss

    def update(self, finite: bool) -> None:
        if not self.enabled:
            return
        if not finite:
            self.scale = max(self.scale / 2.0, 1.0)
            self.good_steps = 0
            return
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale *= 2.0
            self.good_steps = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])

