"""`resources.colocate`: every PPO role in one placement group, generators asleep while the
others score and learn, and on the CPU the same run as with every actor on its own."""
from __future__ import annotations

import pytest
import ray

from orchestration.ppo.trainer import PPOTrainer
from orchestration.rundir import StageDir, read_metrics
from orchestration.stages import ppo
from rlhf.config import check_trainable, load_config
from rlhf.placement import actor_specs, colocated_layout, colocation_problems, gpus_needed

# 2 iterations of 16 episodes, 2 generators and 2 learners: every role in every bundle.
SMALL = ["ppo.episodes=32", "ppo.batch_size=16", "ppo.minibatch_size=8", "ppo.num_generators=2",
         "ppo.num_learners=2", "ppo.checkpoint_every=2", "ppo.compare_ptx=false", "ppo.ptx_seq_len=32",
         "ppo.ptx_ratio=2", "ppo.probe_prompts=4", "model.max_response_tokens=8",
         "data.synthetic.num_prompts=64", "data.synthetic.num_pretrain_docs=200"]
TIMING = ("seconds_", "tokens_per_second", "generated_tokens_per_second")  # and "time": wall clock


# ---------------------------------------------------------------- the layout (no Ray)

def test_layout_seats_one_actor_of_each_role_per_bundle_in_fractions_that_fit():
    cfg = load_config("tiny", ["resources.colocate=true", "resources.num_gpus=4",
                               "ppo.num_generators=4", "ppo.num_learners=2"])
    layout = colocated_layout(cfg, total_cpus=16.0)
    specs = {s.role: s for s in actor_specs(cfg, 16.0)}
    assert len(layout.bundles) == 4 == gpus_needed(cfg)  # the largest role, not 4+1+1+2+2
    assert {r: len(s) for r, s in layout.seats.items()} == {r: s.count for r, s in specs.items()}
    for role, seats in layout.seats.items():
        assert len({s.bundle for s in seats}) == len(seats), role  # a device of its own per rank
    for b, bundle in enumerate(layout.bundles):
        here = [s for seats in layout.seats.values() for s in seats if s.bundle == b]
        assert bundle["GPU"] == 1.0 and sum(s.num_gpus for s in here) <= 1.0
        assert 1.0 - sum(s.num_gpus for s in here) < 1e-3 * len(here)  # the whole GPU is handed out
        assert abs(sum(s.num_cpus for s in here) - bundle["CPU"]) < 1e-9
    # 10 actors on 4 bundles: 3, 3, 2, 2 (reward and reference go where there is room)
    assert sorted(len([1 for seats in layout.seats.values() for s in seats if s.bundle == b])
                  for b in range(4)) == [2, 2, 3, 3]
    assert gpus_needed(load_config("tiny", ["resources.num_gpus=10", "ppo.num_generators=4",
                                            "ppo.num_learners=2"])) == 4 + 1 + 1 + 2 + 2


def test_cpu_layout_has_no_gpus_and_keeps_the_cpu_shares():
    cfg = load_config("tiny", ["resources.colocate=true", *SMALL])
    layout = colocated_layout(cfg, total_cpus=2.0)
    assert layout.bundles == ({"CPU": 0.5}, {"CPU": 0.5})
    assert all(s.num_gpus == 0 and s.num_cpus == 0.125 for seats in layout.seats.values() for s in seats)


def test_what_colocation_cannot_do_yet_is_refused_for_training():
    one_gpu = ["resources.colocate=true", "resources.num_gpus=1"]
    assert check_trainable(load_config("tiny", one_gpu)) == []
    assert check_trainable(load_config("tiny", ["resources.colocate=true", *SMALL])) == []
    tp = load_config("tiny", [*one_gpu, "resources.num_gpus=2", "resources.gpus_per_generator=2"])
    assert [f for f, _ in colocation_problems(tp)] == ["resources.gpus_per_generator"]
    # Several GPUs: a group's ranks are seated a bundle each, and every learner rank sends.
    wide = load_config("tiny", [*one_gpu, "resources.num_gpus=2", "ppo.num_learners=2"])
    assert check_trainable(wide) == []
    vllm = [*one_gpu, "resources.num_gpus=2", "ppo.engine=vllm", "run.device=cuda"]
    assert colocation_problems(load_config("tiny", [*vllm, "ppo.num_learners=2", "ppo.num_generators=2"])) == []
    assert colocation_problems(load_config("tiny", [*vllm, "ppo.num_learners=2"])) == []
    # ... but a colocated vLLM generator opens its weights over CUDA IPC on its own GPU
    lonely = load_config("tiny", [*vllm, "ppo.num_generators=2"])
    assert [f for f, _ in colocation_problems(lonely)] == ["ppo.num_generators"]


# ---------------------------------------------------------------- the run

def _placement(actor) -> dict:
    def where(_instance) -> dict:  # nested: pickled by value
        import re

        import ray
        ctx = ray.get_runtime_context()
        pg = ctx.get_placement_group_id()
        # Ray names a bundle's resources CPU_group_<index>_<pg id> (private API: no public one says)
        held = ray._private.worker.global_worker.core_worker.resource_ids()
        bundles = sorted({int(m.group(1)) for k in held if (m := re.fullmatch(r"CPU_group_(\d+)_\w+", k))})
        return {"pg": pg, "resources": dict(ctx.get_assigned_resources()), "bundles": bundles}
    return actor.__ray_call__.remote(where)


def _run(root, tiny_config, tiny_ppo_inputs, colocate: bool) -> dict:
    cfg = tiny_config(root, *SMALL, f"resources.colocate={str(colocate).lower()}")
    tiny_ppo_inputs(root, cfg)
    stage = StageDir(cfg.output_dir, "ppo")
    trainer = PPOTrainer(cfg, stage, ppo.inputs(cfg), cfg.ppo.ptx_coef)
    team = trainer.team
    try:
        where = {role: ray.get([_placement(a) for a in team.handles(role)]) for role in team.specs}
        pg = team.placement_group
        table = ray.util.placement_group_table(pg) if pg is not None else None
        trainer.run()
        events = ray.get([g.memory_events.remote() for g in team.generators.actors])
        asleep = ray.get([g.asleep.remote() for g in team.generators.actors])
    finally:
        trainer.shutdown()
    return {"cfg": cfg, "team": team, "where": where, "table": table, "pg": pg, "events": events,
            "asleep": asleep, "rows": read_metrics(stage.metrics_file)}


@pytest.fixture(scope="module")
def runs(ray_local, tiny_config, tiny_ppo_inputs, tmp_path_factory):
    return {c: _run(tmp_path_factory.mktemp(f"colocate_{c}"), tiny_config, tiny_ppo_inputs, c)
            for c in (False, True)}


def test_every_colocated_actor_is_in_the_one_placement_group_with_its_seat(runs):
    run = runs[True]
    layout, pg = run["team"].layout, run["pg"]
    assert run["table"]["state"] == "CREATED" and run["table"]["strategy"] == "PACK"
    assert [dict(b) for b in run["table"]["bundles"].values()] == list(layout.bundles)
    for role, placed in run["where"].items():
        assert len(placed) == len(layout.seats[role])
        for got, seat in zip(placed, layout.seats[role]):
            assert got["pg"] == pg.id.hex(), role
            assert got["bundles"] == [seat.bundle], (role, got)  # a group's ranks too: each its own
            assert abs(got["resources"].get("CPU", 0.0) - seat.num_cpus) < 1e-4, (role, got)
            assert got["resources"].get("GPU", 0.0) == seat.num_gpus
    # shut down: the reservation is gone with the actors
    assert ray.util.placement_group_table(pg)["state"] == "REMOVED"


def test_separate_actors_are_in_no_placement_group(runs):
    run = runs[False]
    assert run["pg"] is None and run["team"].layout is None
    assert all(got["pg"] is None for placed in run["where"].values() for got in placed)


def test_generators_sleep_from_sampling_to_the_sync_and_wake_weights_first(runs):
    iterations = len(runs[True]["rows"])
    assert iterations == 2
    # per iteration: the batch, the probe, asleep through score and learn, weights back for the
    # sync, then the KV cache; nothing was ever sampled or loaded while asleep
    expected = ["load 0"] + [e for k in range(1, iterations + 1)
                             for e in ("sample", "sample", "sleep", "wake weights", f"load {k}", "wake kv_cache")]
    assert runs[True]["events"] == [expected, expected]
    assert runs[True]["asleep"] == [[], []]
    separate = ["load 0"] + [e for k in range(1, iterations + 1) for e in ("sample", "sample", f"load {k}")]
    assert runs[False]["events"] == [separate, separate]


def test_colocated_run_gives_the_separate_runs_metrics(runs):
    together, apart = runs[True]["rows"], runs[False]["rows"]
    assert len(together) == len(apart) == 2

    def training(row: dict) -> dict:
        return {k: v for k, v in row.items() if k != "time" and not k.startswith(TIMING)}
    assert training(together[0]).keys() == training(apart[0]).keys()
    for a, b in zip(together, apart):
        assert training(a) == training(b)
    assert together[0]["synced_checksum"] != together[1]["synced_checksum"]  # the weights did move
