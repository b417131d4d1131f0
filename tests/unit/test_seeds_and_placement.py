"""The one seed derivation and the one actor spec list."""
import hashlib

from rlhf.config import load_config
from rlhf.placement import actor_specs, cpu_share, gpus_needed
from rlhf.seeds import derive_seed


def test_derive_seed_is_a_stable_63_bit_hash_of_its_parts():
    expected = int(hashlib.blake2b(b"7/rollout/3", digest_size=8).hexdigest(), 16) // 2
    assert derive_seed(7, "rollout", 3) == expected
    seeds = {derive_seed(7, "rollout", k) for k in range(1000)} | {derive_seed(8, "rollout", 0)}
    assert len(seeds) == 1001 and all(0 <= s < 2**63 for s in seeds)


def test_specs_cover_every_role_with_the_team_counts_and_fit_the_cpus():
    cfg = load_config("tiny", ["ppo.num_generators=3", "ppo.num_learners=2"])
    specs = {s.role: s for s in actor_specs(cfg, total_cpus=2.0)}
    assert {r: s.count for r, s in specs.items()} == {
        "generator": 3, "reward": 1, "reference": 1, "critic": 2, "learner": 2}
    assert sum(s.count * s.num_cpus for s in specs.values()) <= 2.0
    assert all(s.num_gpus == 0 and s.num_threads == 1 for s in specs.values())
    assert cpu_share(4, total_cpus=64.0) == 1.0  # never more than a core each


def test_policy_ranks_share_every_core_and_the_other_roles_take_one_thread():
    one = {s.role: s.num_threads for s in actor_specs(load_config("tiny", []), total_cpus=2.0)}
    assert one == {"generator": 1, "reward": 1, "reference": 1, "critic": 1, "learner": 2}
    four = {s.role: s.num_threads for s in actor_specs(load_config("tiny", ["ppo.num_learners=4"]), 16.0)}
    assert four["learner"] == 4 and four["critic"] == 1


def test_gpu_specs_give_only_generators_tensor_parallel_gpus():
    cfg = load_config("tiny", ["resources.num_gpus=8", "resources.gpus_per_generator=2",
                               "ppo.num_generators=2", "ppo.num_learners=1"])
    specs = {s.role: s for s in actor_specs(cfg, total_cpus=16.0)}
    assert specs["generator"].num_gpus == 2
    # The reference scorer is one HF forward pass per batch, like the reward scorer.
    assert specs["reference"].num_gpus == specs["reward"].num_gpus == 1
    assert gpus_needed(cfg) == 2 * 2 + 1 + 1 + 1 + 1
