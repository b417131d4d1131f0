"""The team starts every PPO actor with the resources of the spec list that `--dry-run` prints."""
from __future__ import annotations

import ray

from orchestration.plan import describe_plan
from orchestration.ppo.trainer import PPOTrainer
from orchestration.rundir import StageDir
from orchestration.stages import ppo
from rlhf.placement import actor_specs


def _granted(actor) -> dict:
    def resources(_instance) -> dict:  # nested: pickled by value
        import ray
        return dict(ray.get_runtime_context().get_assigned_resources())
    return actor.__ray_call__.remote(resources)


def test_started_actors_hold_what_the_specs_and_the_plan_say(ray_local, tiny_config, tiny_ppo_inputs, tmp_path):
    cfg = tiny_config(tmp_path, "ppo.num_generators=2", "ppo.num_learners=2", "resources.num_cpus=2")
    tiny_ppo_inputs(tmp_path, cfg)
    trainer = PPOTrainer(cfg, StageDir(cfg.output_dir, "ppo"), ppo.inputs(cfg), cfg.ppo.ptx_coef)
    try:
        specs = actor_specs(cfg, ray.cluster_resources()["CPU"])
        assert sum(s.count for s in specs) == 2 + 1 + 1 + 2 + 2
        for spec in specs:
            handles = trainer.team.handles(spec.role)
            assert len(handles) == spec.count, spec.role
            for got in ray.get([_granted(h) for h in handles]):
                assert abs(got.get("CPU", 0.0) - spec.num_cpus) < 1e-4, (spec.role, got)
                assert got.get("GPU", 0.0) == spec.num_gpus, (spec.role, got)
    finally:
        trainer.shutdown()
    plan = describe_plan(cfg)
    for spec in actor_specs(cfg, cfg.resources.num_cpus):
        assert f"{spec.title:<20}{spec.count:>6}{spec.num_cpus:>6.2f}" in plan
