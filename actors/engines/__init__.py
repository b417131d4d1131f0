"""Rollout engines behind one interface (`Engine`); vLLM is imported only when chosen."""
from __future__ import annotations

from actors.engines.base import Engine

ENGINES = ("hf", "vllm")


def make_engine(kind: str, policy_path: str, seed: int = 0, **engine_kwargs) -> Engine:
    """Build the `kind` engine; vLLM's module (and vllm itself) loads only for "vllm"."""
    if kind == "hf":
        from actors.engines.hf_engine import HFEngine

        return HFEngine(policy_path, seed=seed, **engine_kwargs)
    if kind == "vllm":
        from actors.engines.vllm_engine import VLLMEngine

        return VLLMEngine(policy_path, seed=seed, **engine_kwargs)
    raise ValueError(f"unknown engine {kind!r}; choose one of {ENGINES}")


__all__ = ["ENGINES", "Engine", "make_engine"]
