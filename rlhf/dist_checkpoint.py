"""Sharded checkpoints: every rank writes its own shards (torch.distributed.checkpoint).

    <dir>/.metadata, __<rank>_0.distcp   model, Adam state and other sharded tensors
                                          (e.g. the EMA), as DCP writes them
    <dir>/rank<r>.pt                      each rank's plain state: LR schedule, RNG,
                                          counters (torch.save of tensors and containers)

A checkpoint never runs code when loaded, like the rest of ours: DCP reads its
`.metadata` with plain pickle, so `SafeReader` reads it with an unpickler that
only builds DCP's own metadata classes; tensor data and `rank<r>.pt` load with
`weights_only=True`. A checkpoint written by N ranks loads on N ranks (DCP can
reshard, but the plain per-rank state cannot).
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from rlhf.train_state import to_cpu

# (module, name) pairs a DCP `.metadata` file is made of (torch 2.13), and nothing else.
_METADATA_GLOBALS = {
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "Path"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("collections", "OrderedDict"),
}
_METADATA_MODULE = "torch.distributed.checkpoint.metadata"


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module == _METADATA_MODULE or (module, name) in _METADATA_GLOBALS or \
                (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, "
                                     "which a DCP checkpoint never holds; refusing to load it")


class SafeReader(dcp.FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any):
        path = Path(self.path) / ".metadata"
        with open(path, "rb") as f:
            try:
                metadata = _MetadataUnpickler(f).load()
            except (pickle.UnpicklingError, EOFError, AttributeError) as e:
                raise ValueError(f"{path}: not a loadable checkpoint ({e})") from None
        if getattr(metadata, "storage_meta", None) is None:
            from torch.distributed.checkpoint.metadata import StorageMeta
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def save(directory: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         tensors: dict[str, dict[str, torch.Tensor]], plain: dict[str, Any]) -> None:
    """Collective: every rank of the model's group calls it with the same directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optimizer": osd, **tensors}, checkpoint_id=str(directory))
    torch.save(to_cpu(plain), directory / f"rank{_rank()}.pt")


def load(directory: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         tensors: dict[str, dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Collective: loads the model and optimizer, and `tensors` in place; returns this rank's plain state."""
    from rlhf.models import load_state_file  # models imports transformers: only when loading

    directory = Path(directory)
    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optimizer": osd, **tensors}
    dcp.load(state, checkpoint_id=str(directory), storage_reader=SafeReader(str(directory)))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    return load_state_file(directory / f"rank{_rank()}.pt")


def is_sharded_checkpoint(directory: str | Path) -> bool:
    return (Path(directory) / ".metadata").is_file()
