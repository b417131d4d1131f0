"""Weight sync: learner -> generators over the Ray object store, against the transport's limit.

    .venv/bin/python bench/weight_sync.py [--quick]

1. The real path: a PolicyLearner (rank 0 of a WorkerGroup) and 1, 2 or 4
   RolloutGenerator actors (hf engine) holding GPT-2 policies of ~10M and ~100M
   parameters; `ObjectStoreSync.sync()` as the PPO trainer calls it (the learner
   puts its flat parameter buffers; every generator points its model at them and
   checksums while the learner checksums; the driver verifies), with the phases
   timed apart: publish (put on the learner), update (get + install + checksum on
   each generator), and the checksums alone.
2. The limit: one `ray.put` of a single flat buffer of the same bytes in one
   actor and a `ray.get` of it in each of the 1, 2 or 4 receiving actors.
3. Bytes, not tensors: the same bytes as 10 or 1000 tensors through the same
   put/unpack/install/checksum code in minimal actors.
All actors are single-threaded on a local `ray.init(num_cpus=2)`. Times are the
best of `--repeats` (the least disturbed by other load).
Writes bench/results/weight_sync.json.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import build_models, print_table, start_local_ray, write_results  # noqa: E402

# GPT-2 shapes of ~10M and ~100M parameters (vocab 1024)
POLICIES = {"10M": dict(n_layer=12, n_head=4, n_embd=256), "100M": dict(n_layer=14, n_head=12, n_embd=768)}
QUICK_POLICIES = {"10M": POLICIES["10M"]}
CPUS = 0.1  # fractional requests: 1 learner + 4 generators + probes fit on 2 CPUs


class FlatSource:
    """The limit's sender: one flat, already-written buffer, put whole."""

    def __init__(self, nbytes: int) -> None:
        torch.set_num_threads(1)
        self.buf = np.ones(nbytes, dtype=np.uint8)

    def put(self) -> list:
        return [ray.put(self.buf)]


class Sender:
    """Minimal learner side: PolicyLearner's CPU publish (flat parameters, put, checksum) on `n` tensors."""

    def __init__(self, n_tensors: int, total_params: int) -> None:
        from actors.weight_sync import FlatParameters

        torch.set_num_threads(1)
        g = torch.Generator().manual_seed(0)
        self.module = torch.nn.ParameterDict(
            {f"t{i}": torch.randn(total_params // n_tensors, generator=g) for i in range(n_tensors)})
        self.flat = FlatParameters(self.module)

    def publish(self) -> tuple:
        from actors.weight_sync import checksum, put_buckets

        buffers, meta = self.flat.buckets(self.module)
        return put_buckets(buffers), meta, checksum(self.module.named_parameters())


class Receiver:
    """Minimal generator side: RolloutGenerator.update_weights + HFEngine.load_weights' code."""

    def __init__(self, n_tensors: int, total_params: int) -> None:
        torch.set_num_threads(1)
        self.named = {f"t{i}": torch.zeros(total_params // n_tensors) for i in range(n_tensors)}

    def update(self, meta, *buckets) -> str:
        from actors.weight_sync import checksum, resolve_buckets, unpack_buckets

        buffers, immutable = resolve_buckets(buckets)
        for name, t in unpack_buckets(buffers, meta).items():
            if immutable:
                self.named[name] = t
            else:
                self.named[name].copy_(t)
        return checksum(self.named)

    def receive(self, *buffers) -> int:
        """The limit's receiver: Ray has already fetched and deserialised the arguments."""
        return sum(b.nbytes for b in buffers)


def timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def limit_seconds(nbytes: int, receivers: list, repeats: int) -> float:
    source = ray.remote(FlatSource).options(num_cpus=CPUS).remote(nbytes)

    def once():
        refs = ray.get(source.put.remote())
        got = ray.get([r.receive.remote(*refs) for r in receivers])
        assert all(g == nbytes for g in got)

    once()
    out = timed(once, repeats)
    ray.kill(source)
    return out


def real_path(name: str, shape: dict, n_gens: list[int], repeats: int, folder: Path) -> list[dict]:
    from actors import PolicyLearner, RolloutGenerator, WorkerGroup, actor_class
    from orchestration.ppo.weight_sync import ObjectStoreSync

    models = build_models(folder / name, vocab_size=1024, n_positions=128, **shape)
    nbytes = models.params * 4
    learners = WorkerGroup(PolicyLearner, 1, str(models.policy), num_cpus=CPUS, num_threads=1, device="cpu")
    gens = [actor_class(RolloutGenerator, CPUS).remote(str(models.policy), engine="hf", seed=i, num_threads=1,
                                                      device="cpu") for i in range(max(n_gens))]
    receivers = [ray.remote(Receiver).options(num_cpus=CPUS).remote(1, 1) for _ in range(max(n_gens))]
    learners.wait_ready()
    rows = []
    for n in n_gens:
        sync = ObjectStoreSync(learners, gens[:n])
        sync.sync()  # warm-up: first-touch allocations on both sides
        total = timed(sync.sync, repeats)
        refs, meta, version = ray.get(learners.call_rank0("publish_weights"))
        publish = timed(lambda: ray.get(learners.call_rank0("publish_weights")), repeats)
        update = timed(lambda: ray.get([g.update_weights.remote(version, meta, *refs) for g in gens[:n]]), repeats)
        learner_sum = timed(lambda: ray.get(learners.call_rank0("checksum")), repeats)
        gen_sum = timed(lambda: ray.get([g.checksum.remote() for g in gens[:n]]), repeats)
        limit = limit_seconds(nbytes, receivers[:n], repeats)
        rows.append({"policy": name, "params_M": models.params / 1e6, "MB": nbytes / 1e6, "generators": n,
                     "sync_s": total, "GB_s": nbytes / total / 1e9, "limit_s": limit,
                     "limit_GB_s": nbytes / limit / 1e9, "vs_limit": limit / total,
                     "publish_s": publish, "update_s": update, "learner_checksum_s": learner_sum,
                     "generators_checksum_s": gen_sum, "buckets": len(meta)})
        print_table("weight sync (so far)", rows[-1:], list(rows[-1]))
    learners.shutdown()
    for a in gens + receivers:
        ray.kill(a)
    return rows


def tensor_count(total_params: int, counts: list[int], repeats: int) -> list[dict]:
    rows = []
    for k in counts:
        sender = ray.remote(Sender).options(num_cpus=CPUS).remote(k, total_params)
        receiver = ray.remote(Receiver).options(num_cpus=CPUS).remote(k, total_params)

        def once():
            refs, meta, digest = ray.get(sender.publish.remote())
            assert ray.get(receiver.update.remote(meta, *refs)) == digest

        once()
        seconds = timed(once, repeats)
        limit = limit_seconds(total_params * 4, [receiver], repeats)
        rows.append({"MB": total_params * 4 / 1e6, "tensors": k, "sync_s": seconds,
                     "GB_s": total_params * 4 / seconds / 1e9, "limit_s": limit, "vs_limit": limit / seconds})
        ray.kill(sender)
        ray.kill(receiver)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: the 10M policy, 1-2 generators")
    parser.add_argument("--repeats", type=int, default=7,
                        help="best of N for each measurement: fresh object-store pages make some runs 5x slower")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start_local_ray(2)
    repeats = 1 if args.quick else args.repeats
    policies, n_gens = (QUICK_POLICIES, [1, 2]) if args.quick else (POLICIES, [1, 2, 4])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, shape in policies.items():
            rows += real_path(name, shape, n_gens, repeats, Path(tmp))
    sizes = [2_500_000] if args.quick else [10_000_000, 100_000_000]
    counts = [10, 1000]
    scaling = [r for total in sizes for r in tensor_count(total, counts, repeats)]
    ray.shutdown()

    print_table("weight sync: PolicyLearner -> RolloutGenerators (ObjectStoreSync, verified)", rows,
                ["policy", "MB", "generators", "buckets", "sync_s", "GB_s", "limit_s", "limit_GB_s", "vs_limit"])
    print_table("where a sync's time goes (seconds)", rows,
                ["policy", "generators", "sync_s", "publish_s", "update_s", "learner_checksum_s",
                 "generators_checksum_s", "limit_s"])
    print_table("same bytes as 10 vs 1000 tensors (minimal actors, same pack/unpack/checksum code)", scaling,
                ["MB", "tensors", "sync_s", "GB_s", "limit_s", "vs_limit"])
    write_results("weight_sync", {"repeats": repeats, "rows": rows, "tensor_count": scaling}, quick=args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
