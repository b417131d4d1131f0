"""The resource plan and batch geometry, printed by `--dry-run` before anything starts."""
from __future__ import annotations

import os

from rlhf.config import Config
from rlhf.placement import actor_specs, gpus_needed


def describe_plan(cfg: Config, command: str = "run") -> str:
    p = cfg.ppo
    lines = [f"config: {cfg.source}", f"command: {command}", f"output: {cfg.run.output_dir}", ""]
    lines.append("stages: " + ", ".join(
        s for s, on in (("pretrain", cfg.pretrain.enabled), ("sft", cfg.sft.enabled),
                        ("ppo_init_sft", cfg.ppo_init_sft.enabled), ("rm", cfg.rm.enabled),
                        ("ppo", p.enabled), ("ppo (no ptx, for comparison)", p.enabled and p.compare_ptx),
                        ("eval", True)) if on))
    lines += [
        "",
        "PPO batch geometry:",
        f"  {p.episodes} episodes = {cfg.ppo_iterations} iterations x {p.batch_size} episodes",
        f"  {p.batch_size // p.minibatch_size} minibatches of {p.minibatch_size} x {p.ppo_epochs} epoch(s)"
        f" = {p.batch_size // p.minibatch_size * p.ppo_epochs} optimizer steps per iteration",
        f"  per learner: {p.minibatch_size // p.num_learners} episodes per minibatch"
        f" ({p.num_learners} learners)",
        f"  ptx: {p.ptx_ratio * p.minibatch_size} pretraining sequences per minibatch, coef {p.ptx_coef}",
        f"  KL beta {p.kl_coef}, clip {p.clip_ratio}, GAE gamma {p.gamma} lambda {p.lam},"
        f" EMA {p.ema_decay}, T {p.temperature}",
        "",
        f"PPO actor groups (engine {p.engine}):",
        f"  {'role':<20}{'count':>6}{'cpus':>6}{'gpus':>6}{'threads':>8}",
    ]
    # The CPU shares the team would request on a cluster of this many CPUs.
    for s in actor_specs(cfg, cfg.resources.num_cpus or os.cpu_count() or 1):
        lines.append(f"  {s.title:<20}{s.count:>6}{s.num_cpus:>6.2f}{s.num_gpus:>6g}{s.num_threads:>8}")
    total_gpus = gpus_needed(cfg)
    have = cfg.resources.num_gpus
    lines.append(f"  GPUs needed: {total_gpus}; configured: {have}"
                 + ("" if total_gpus <= have or cfg.resources.colocate else "  <-- not enough"))
    return "\n".join(lines)
