"""Exponential moving average of a policy's weights (paper: decay 0.992).

shadow <- decay * shadow + (1 - decay) * param, for floating-point parameters,
kept in fp32 so small updates are not lost when the model runs in fp16/bf16.
Buffers are copied, not averaged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class EMA:
    """EMA shadow of `model`'s floating-point parameters."""

    def __init__(self, model: nn.Module, decay: float = 0.992) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.shadow: dict[str, torch.Tensor] = {
            name: p.detach().float().clone()
            for name, p in model.named_parameters()
            if p.is_floating_point()
        }
        self.buffers: dict[str, torch.Tensor] = {
            name: b.detach().clone() for name, b in model.named_buffers()
        }

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's current weights into the shadow."""
        params = dict(model.named_parameters())
        for name, shadow in self.shadow.items():
            if name not in params:
                raise KeyError(f"model has no parameter {name!r} tracked by the EMA")
            shadow.mul_(self.decay).add_(params[name].detach().float(), alpha=1.0 - self.decay)
        for name, buf in model.named_buffers():
            self.buffers[name] = buf.detach().clone()
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's parameters (in their own dtype) and buffers."""
        params = dict(model.named_parameters())
        for name, shadow in self.shadow.items():
            params[name].copy_(shadow.to(dtype=params[name].dtype, device=params[name].device))
        model_buffers = dict(model.named_buffers())
        for name, buf in self.buffers.items():
            model_buffers[name].copy_(buf)

    def state_dict(self) -> dict[str, Any]:
        return {
            "decay": self.decay,
            "num_updates": self.num_updates,
            "shadow": {k: v.clone() for k, v in self.shadow.items()},
            "buffers": {k: v.clone() for k, v in self.buffers.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state["shadow"]) != set(self.shadow):
            raise KeyError("EMA state_dict parameter names do not match this EMA")
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        for name, value in state["shadow"].items():
            self.shadow[name] = value.detach().float().clone().to(self.shadow[name].device)
        self.buffers = {k: v.detach().clone() for k, v in state["buffers"].items()}
