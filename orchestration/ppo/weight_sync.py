"""Learner -> generators weight broadcast, chosen once per run.

Both transports are bucketed and versioned, and verify that every generator holds
exactly the learner's weights afterwards (checksums compared).
- ObjectStoreSync (CPU, hf engine): learner rank 0 puts a few flat buckets in the
  Ray object store once; every generator reads the same refs.
- VLLMSync (GPU, vllm engine): vLLM's own NCCL/IPC weight transfer.

A dead generator or learner surfaces as `faults.ActorLost` naming it, so the
driver can restart it. `only` syncs some generators (a restarted one);
`rewind` lets generators go back to an older version (after the run rewound to
a checkpoint).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import ray

from actors.group import WorkerGroup
from orchestration.ppo.faults import ActorLost, gather


class ObjectStoreSync:
    def __init__(self, learners: WorkerGroup, generators: list):
        self.learners, self.generators = learners, generators

    def sync(self, only: Sequence[int] | None = None, rewind: bool = False) -> dict:
        # All submitted at once: the generators start when the learner has published, and
        # the learner fingerprints its weights while they load theirs.
        published = self.publish()
        which = list(range(len(self.generators))) if only is None else list(only)
        loading = [self.generators[i].install_published.remote(published.ref, rewind=rewind) for i in which]
        return published.verify(lambda: gather(loading, "generator", which))

    def publish(self) -> "Published":
        """The learners' weights into the object store and their checksum, not waited for.
        Every rank takes part (sharded, publishing and checksums gather the weights); rank 0
        answers. The objects are the learner's: they live as long as it does."""
        return Published(self.learners.call_all("publish_weights"), self.learners.call_all("checksum"))

    def reconnect(self, generator) -> None:
        """A restarted generator needs nothing special: the next sync reaches it."""


@dataclass(frozen=True)
class Published:
    """One version of the learners' weights in the object store, for generators to install."""
    publishing: list  # per rank: rank 0's is (bucket refs, meta, version)
    checksums: list

    @property
    def ref(self) -> ray.ObjectRef:
        return self.publishing[0]

    def verify(self, loaded: Callable[[], list[str]]) -> dict:
        """The sync's metrics, once the generators' checksums (`loaded()`) match the learner's.
        The learner's results are gathered first, so a dead learner is not blamed on a generator."""
        (_, _, version), checksum = gather([self.publishing[0], self.checksums[0]], "learner")
        gather(self.publishing[1:] + self.checksums[1:], "learner")
        return _verified(checksum, loaded(), version)


class VLLMSync:
    def __init__(self, learners: WorkerGroup, generators: list, backend: str):
        from actors import weight_transport_vllm
        self._t = weight_transport_vllm
        self.learners, self.generators, self.backend = learners, generators, backend
        learners.wait_ready()  # a rank's weights are its final (sharded) ones once it has joined
        self._t.connect(learners.workers, generators, backend=backend)

    def sync(self, only: Sequence[int] | None = None, rewind: bool = False) -> dict:
        """Every generator (an NCCL broadcast reaches the whole group), from every learner rank
        (under fsdp each holds a shard); versions are set, not compared, so `rewind` needs nothing."""
        try:
            version, checksum = self._t.sync(self.learners.workers, self.generators)  # raises on a mismatch
        except ray.exceptions.RayActorError:
            self._name_the_dead()
            raise
        return {"synced_version": version, "synced_generators": len(self.generators),
                "synced_checksum": checksum}

    def _name_the_dead(self) -> None:
        """Turn a death inside the transport into ActorLost for the actor that died.

        Asked of every learner rank and generator at once, the first death answering: a
        survivor may be stuck (a learner rank in a gather with a dead one, a generator in an
        NCCL receive) where asking one role after the other would wait for it. (A generator
        that died under rank 0's RPCs reaches the driver as rank 0's error; the learner
        answering here is what tells it apart.)
        """
        who = [("learner", i) for i in range(len(self.learners))] + \
              [("generator", i) for i in range(len(self.generators))]
        refs = self.learners.call_all("weight_version") + [g.weight_version.remote() for g in self.generators]
        role_of = dict(zip(refs, who))
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            try:
                ray.get(ready[0])
            except ray.exceptions.RayActorError as e:
                raise ActorLost(*role_of[ready[0]], e) from e

    def reconnect(self, generator) -> None:
        self._t.connect(self.learners.workers, self.generators, backend=self.backend)


def _verified(checksum: str, got: list[str], version: int) -> dict:
    if any(c != checksum for c in got):
        raise RuntimeError(f"weight sync failed: learner checksum {checksum}, generators {got}")
    return {"synced_version": version, "synced_generators": len(got), "synced_checksum": checksum}


def make_sync(engine: str, learners: WorkerGroup, generators: list, backend: str = "nccl"):
    return VLLMSync(learners, generators, backend) if engine == "vllm" else ObjectStoreSync(learners, generators)
