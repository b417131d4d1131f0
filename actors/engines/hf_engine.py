"""The `hf` engine: a transformers causal LM sampled with rlhf.sampling (KV cache), CPU or CUDA.

A call's prompts are split so each sampling pass holds at most `token_budget`
tokens (rows x (widest prompt + max_new_tokens)): the out-of-memory guard. The
pieces are re-aligned to one prompt width so the result is a single `Samples`.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

from actors.resources import parse_dtype, pick_device
from actors.weight_sync import checksum
from rlhf.models import load_policy
from rlhf.sampling import Samples, sample


def budget_chunks(lengths: Sequence[int], max_new_tokens: int, token_budget: int) -> list[range]:
    """Consecutive row ranges with rows * (widest prompt + max_new_tokens) <= budget.

    A single row over the budget still gets a range of its own (it cannot be split).
    """
    chunks, start, width = [], 0, 0
    for i, n in enumerate(lengths):
        wider = max(width, n)
        if i > start and (i - start + 1) * (wider + max_new_tokens) > token_budget:
            chunks.append(range(start, i))
            start, wider = i, n
        width = wider
    if start < len(lengths):
        chunks.append(range(start, len(lengths)))
    return chunks


def _first_id(value) -> int | None:
    if isinstance(value, (list, tuple)):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def align(parts: Sequence[Samples], pad_id: int) -> Samples:
    """Concatenate samples with different prompt widths / lengths into one batch.

    Prompts are padded on the left to the widest, responses on the right to the
    longest; padding has mask 0, logprob 0 and the pad id.
    """
    width = max(p.prompt_width for p in parts)
    total = max(width - p.prompt_width + p.input_ids.shape[1] for p in parts)

    def pad(x: torch.Tensor, left: int, value) -> torch.Tensor:
        right = total - left - x.shape[1]
        return torch.nn.functional.pad(x, (left, right), value=value)

    fields: dict[str, list[torch.Tensor]] = {"ids": [], "attn": [], "act": [], "logp": []}
    for p in parts:
        left = width - p.prompt_width
        fields["ids"].append(pad(p.input_ids, left, pad_id))
        fields["attn"].append(pad(p.attention_mask, left, 0))
        fields["act"].append(pad(p.action_mask, left, 0))
        fields["logp"].append(pad(p.sampler_logprobs, left, 0.0))
    return Samples(*(torch.cat(v) for v in fields.values()), prompt_width=width)


class HFEngine:
    """One transformers copy of the policy; implements `actors.engines.base.Engine`."""

    def __init__(self, policy_path: str, *, seed: int = 0, device: str = "auto",
                 dtype: str | None = None, token_budget: int = 65536,
                 eos_id: int | None = None, pad_id: int | None = None) -> None:
        self.device = pick_device(device)
        self.model = load_policy(policy_path, dtype=parse_dtype(dtype)).to(self.device).eval()
        cfg, gen = self.model.config, self.model.generation_config
        self.eos_id = eos_id if eos_id is not None else (
            _first_id(gen.eos_token_id) if gen.eos_token_id is not None else _first_id(cfg.eos_token_id))
        if self.eos_id is None:
            raise ValueError(f"{policy_path}: no eos_token_id in its config; pass eos_id")
        pad = pad_id if pad_id is not None else _first_id(cfg.pad_token_id)
        # Padding is masked everywhere, so falling back to EOS as its id is safe.
        self.pad_id = pad if pad is not None else self.eos_id
        self.token_budget = token_budget
        self.rng = torch.Generator(device=self.device).manual_seed(seed)

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int | None = None) -> Samples:
        if not prompts:
            raise ValueError("generate needs at least one prompt")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("empty prompt: every prompt needs at least one token")
        rng = self.rng if seed is None else torch.Generator(device=self.device).manual_seed(seed)
        parts = [sample(self.model, [prompts[i] for i in rows], max_new_tokens, self.eos_id,
                        self.pad_id, temperature=temperature, top_p=top_p, generator=rng)
                 for rows in budget_chunks([len(p) for p in prompts], max_new_tokens, self.token_budget)]
        return parts[0] if len(parts) == 1 else align(parts, self.pad_id)

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], borrow: bool = False) -> None:
        params = dict(self.model.named_parameters())
        incoming = dict(named_tensors)
        unknown = sorted(set(incoming) - set(params))
        missing = sorted(set(params) - set(incoming))
        if unknown or missing:
            # A partial update would leave a policy nobody trained: refuse it whole.
            raise KeyError(f"weight names do not match the model: unknown {unknown[:5]}, "
                           f"missing {missing[:5]}")
        for name, tensor in incoming.items():
            if tuple(tensor.shape) != tuple(params[name].shape):
                raise ValueError(f"{name}: shape {tuple(tensor.shape)} != {tuple(params[name].shape)}")
        for name, tensor in incoming.items():
            p = params[name]
            if borrow and tensor.device == p.device and tensor.dtype == p.dtype:
                # Sampling only reads the weights: point at the snapshot instead of copying
                # it (a 400 MB copy was most of a generator's update); the previous
                # version's memory is released with its last view.
                p.data = tensor
            else:
                p.copy_(tensor)

    def state_checksum(self) -> str:
        return checksum(self.model.named_parameters())

    # ---- sharing the device with learners (colocation) ----
    # No KV cache outlives a `generate` call here, so the weights are all there is to free.
    # On the CPU there is nothing to free: both are no-ops.
    def sleep(self, level: int = 1) -> None:
        """Level >= 1 on a GPU: the weights wait in CPU memory (parameters keep their identity)."""
        if level >= 1 and self.device.type != "cpu":
            self.model.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # back to the driver, for the other processes on the GPU

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """The weights back on the engine's device ("kv_cache" needs nothing)."""
        if (tags is None or "weights" in tags) and self.device.type != "cpu":
            self.model.to(self.device)
