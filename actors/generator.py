"""RolloutGenerator: samples responses with the current policy weights and says which weights.

Plain class; run it as a Ray actor with `actors.resources.actor_class(RolloutGenerator,
num_cpus=0.25).remote(...)`. Every Rollout records the weight version it was
sampled with; `update_weights` installs version v from bucketed buffers and returns
the engine's checksum, which the driver compares with the learner's.
"""
from __future__ import annotations

from typing import Any

from actors.engines import make_engine
from actors.resources import configure_threads
from actors.weight_sync import BucketMeta, resolve_buckets, unpack_buckets
from rlhf.experience import Rollout


class RolloutGenerator:
    def __init__(self, policy_path: str, engine: str = "hf", seed: int = 0,
                 num_threads: int | None = None, device: str = "auto",
                 engine_kwargs: dict[str, Any] | None = None) -> None:
        configure_threads(num_threads)
        kwargs = dict(engine_kwargs or {})
        if engine == "hf":
            kwargs.setdefault("device", device)
        self.engine = make_engine(engine, policy_path, seed=seed, **kwargs)
        self.engine_name = engine
        # Version 0 = the weights at policy_path, which the learners also start from.
        self._version = 0

    def generate(self, prompt_ids: list[list[int]], prompt_texts: list[str], max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None) -> Rollout:
        if len(prompt_ids) != len(prompt_texts):
            raise ValueError(f"{len(prompt_ids)} prompt id lists but {len(prompt_texts)} prompt texts")
        s = self.engine.generate([list(p) for p in prompt_ids], max_new_tokens,
                                 temperature=temperature, top_p=top_p, seed=seed)
        return Rollout(input_ids=s.input_ids, attention_mask=s.attention_mask,
                       action_mask=s.action_mask, sampler_logprobs=s.sampler_logprobs,
                       prompts=list(prompt_texts), weight_version=self._version)

    def update_weights(self, version: int, meta: list[BucketMeta], *buckets) -> str:
        """Install weight `version` from flat buffers (tensors or ObjectRefs) laid out by `meta`.

        Returns the engine's checksum after loading, for the driver to verify.
        """
        if version < self._version:
            raise ValueError(f"weight version {version} is older than the installed {self._version}")
        named = unpack_buckets(resolve_buckets(buckets), meta)
        self.engine.load_weights(named.items())
        self._version = int(version)
        return self.engine.state_checksum()

    def checksum(self) -> str:
        return self.engine.state_checksum()

    def weight_version(self) -> int:
        return self._version

    def set_weight_version(self, version: int) -> None:
        """Record a version installed through an engine-native transport (vLLM NCCL)."""
        self._version = int(version)

    def call_engine(self, method: str, *args, **kwargs):
        """Engine-specific steps of a transport (e.g. vLLM's weight-transfer handshake)."""
        return getattr(self.engine, method)(*args, **kwargs)
