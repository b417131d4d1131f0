"""RolloutGenerator: samples responses with the current policy weights and says which weights.

Plain class; run it as a Ray actor with `actors.resources.actor_class(RolloutGenerator,
num_cpus=0.25).remote(...)`. Every Rollout records the weight version it was
sampled with; `update_weights` installs version v from bucketed buffers and returns
the engine's checksum, which the driver compares with the learner's.

`generation_passes` reports the sampling passes of the last call as seen by the
model itself (hf engine): rows and KV-cache positions of each, so the token
budget (the out-of-memory guard) is observable from outside the actor.

Colocated with learners on one GPU, a generator sleeps while they train (`sleep`:
the engine frees its memory) and wakes before it is used (`wake_up`, weights first
so a sync needs no KV cache beside it). A weight load or a sample wakes what it
needs by itself, so nothing ever reaches a sleeping engine; `memory_events` is
the order it all happened in.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Sequence

import torch

from actors.engines import make_engine
from actors.resources import configure_threads
from actors.weight_sync import BucketMeta, resolve_buckets, unpack_buckets
from rlhf.experience import Rollout

SLEEP_TAGS = ("weights", "kv_cache")  # what an engine frees when it sleeps (vLLM's names)


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
        self._installed: tuple | None = None  # (version, object refs) of the last install_published, checksum
        self._passes: list[tuple[int, int]] = []
        self._asleep: set[str] = set()
        self._events: deque[str] = deque(maxlen=256)
        model = getattr(self.engine, "model", None)
        if isinstance(model, torch.nn.Module):
            model.register_forward_pre_hook(self._record_pass, with_kwargs=True)

    def _record_pass(self, module, args, kwargs) -> None:
        """On each pass's first forward (empty KV cache): its rows and cache capacity."""
        cache, ids = kwargs.get("past_key_values"), kwargs.get("input_ids")
        if cache is None or ids is None or cache.get_seq_length() != 0:
            return
        capacity = getattr(cache.layers[0], "capacity", None) if getattr(cache, "layers", None) else None
        self._passes.append((int(ids.shape[0]), int(capacity if capacity is not None else ids.shape[1])))

    def generate(self, prompt_ids: list[list[int]], prompt_texts: list[str], max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None) -> Rollout:
        if len(prompt_ids) != len(prompt_texts):
            raise ValueError(f"{len(prompt_ids)} prompt id lists but {len(prompt_texts)} prompt texts")
        self.wake_up()
        self._events.append("sample")
        self._passes = []
        s = self.engine.generate([list(p) for p in prompt_ids], max_new_tokens,
                                 temperature=temperature, top_p=top_p, seed=seed)
        return Rollout(input_ids=s.input_ids, attention_mask=s.attention_mask,
                       action_mask=s.action_mask, sampler_logprobs=s.sampler_logprobs,
                       prompts=list(prompt_texts), weight_version=self._version)

    def sample(self, prompt_ids: list[list[int]], prompt_texts: list[str], max_new_tokens: int,
               temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None
               ) -> tuple[Rollout, list[tuple[int, int]]]:
        """`generate` and its `generation_passes` in one call (one round trip per shard)."""
        rollout = self.generate(prompt_ids, prompt_texts, max_new_tokens, temperature, top_p, seed)
        return rollout, self.generation_passes()

    def generation_passes(self) -> list[tuple[int, int]]:
        """(rows, KV-cache positions) of each sampling pass of the last `generate` (hf engine)."""
        return list(self._passes)

    def update_weights(self, version: int, meta: list[BucketMeta], *buckets, rewind: bool = False) -> str:
        """Install weight `version` from flat buffers (tensors or ObjectRefs) laid out by `meta`.

        Returns the engine's checksum after loading, for the driver to verify. An
        older version is refused unless `rewind` (the run went back to a checkpoint).
        """
        if version < self._version and not rewind:
            raise ValueError(f"weight version {version} is older than the installed {self._version}")
        buffers, immutable = resolve_buckets(buckets)
        self.wake_up(["weights"])
        self.engine.load_weights(unpack_buckets(buffers, meta).items(), borrow=immutable)
        self._events.append(f"load {int(version)}")
        self._version, self._installed = int(version), None
        return self.engine.state_checksum()

    def install_published(self, published: tuple, rewind: bool = False) -> str:
        """`update_weights` from a learner's `publish_weights` result `(refs, meta, version)`.

        The driver passes the ObjectRef of that result straight on, so this starts the
        moment the learner has published, without a round trip through the driver.
        """
        refs, meta, version = published
        key = (int(version), [r.hex() for r in refs])
        if self._installed is not None and self._installed[0] == key:
            return self._installed[1]  # the same published weights again (async: a probe after a sample)
        checksum = self.update_weights(version, meta, *refs, rewind=rewind)
        self._installed = (key, checksum)
        return checksum

    def checksum(self) -> str:
        return self.engine.state_checksum()

    def weight_version(self) -> int:
        return self._version

    def set_weight_version(self, version: int) -> None:
        """Record a version installed through an engine-native transport (vLLM NCCL/IPC)."""
        self._version = int(version)
        self._events.append(f"load {int(version)}")

    def call_engine(self, method: str, *args, **kwargs):
        """Engine-specific steps of a transport (e.g. vLLM's weight-transfer handshake)."""
        self.wake_up(["weights"])  # every such step writes or reads the weights
        return getattr(self.engine, method)(*args, **kwargs)

    # ---- sharing the device with learners ----
    def sleep(self, level: int = 1) -> None:
        """Free the engine's device memory until `wake_up` (vLLM level 1: weights to CPU, KV
        cache dropped). Asleep already: nothing (a retried call is harmless)."""
        if not self._asleep:
            self.engine.sleep(level)
            self._asleep = set(SLEEP_TAGS)
            self._events.append("sleep")

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Take back the memory of `tags` (default: all); what is awake already is skipped."""
        unknown = set(tags or ()) - set(SLEEP_TAGS)
        if unknown:
            raise ValueError(f"unknown sleep tags {sorted(unknown)}; choose from {SLEEP_TAGS}")
        waking = [t for t in SLEEP_TAGS if t in self._asleep and (tags is None or t in tags)]
        if waking:
            self.engine.wake_up(waking)
            self._asleep -= set(waking)
            self._events.append("wake " + ",".join(waking))

    def asleep(self) -> list[str]:
        return [t for t in SLEEP_TAGS if t in self._asleep]

    def memory_events(self) -> list[str]:
        """The latest samples, loads ("load v"), sleeps and wakes, oldest first."""
        return list(self._events)
