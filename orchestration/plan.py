"""The resource plan and batch geometry, printed by `--dry-run` before anything starts."""
from __future__ import annotations

import os

from rlhf import memory_math as mm
from rlhf.config import Config
from rlhf.memory_plan import MemoryPlan, memory_plan
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
    lines += ["", *describe_memory(cfg, memory_plan(cfg))]
    return "\n".join(lines)


def describe_memory(cfg: Config, plan: MemoryPlan) -> list[str]:
    """The memory plan as a table: each role's bytes per GPU at its worst phase (docs/memory_plan.md)."""
    r = cfg.resources
    if plan.unknown:
        return [f"Memory per GPU: not planned, the shape of {', '.join(plan.unknown)} is unknown here "
                "(a local HF directory with config.json, or a model in rlhf.memory_math.KNOWN_SHAPES)"]
    big = max((x.total for x in plan.roles), default=0.0) >= mm.GB
    unit, g = ("GB", mm.GB) if big else ("MB", 1e6)
    where = f"GPU {r.gpu_memory_gb:g} GB" if r.num_gpus else "CPU run: no GPU budget, nothing checked"
    lines = [f"Memory per {'GPU' if r.num_gpus else 'actor'}, {unit} ({r.strategy}, {cfg.model.dtype} compute"
             f"{', activation checkpointing' if r.activation_checkpointing else ''}; {where}):",
             f"  {'role':<22}{'gpus' if r.num_gpus else 'ranks':>5}{'weights':>9}{'grads':>8}{'optim':>8}"
             f"{'activ':>8}{'kv':>8}{'other':>7}{'total':>8}  peak phase"]
    problems = plan.problems() if r.num_gpus else []
    over = {msg.split(" needs ")[0] for _, msg in problems}
    for x in plan.roles:
        flag = "  <-- over" if x.title in over else ""
        lines.append(f"  {x.title:<22}{x.gpus:>5}{x.weights / g:>9.2f}{x.grads / g:>8.2f}{x.optimizer / g:>8.2f}"
                     f"{x.activations / g:>8.2f}{x.kv_cache / g:>8.2f}{x.runtime / g:>7.1f}{x.total / g:>8.2f}"
                     f"  {x.phase}{flag}")
    lines += ["  weights: float32 master + the compute copy (fsdp: the gathered root and blocks); grads: .grad",
              "  + flat buckets; optim: Adam moments (+ the policy's EMA); other: CUDA context, workspaces, NCCL"]
    if plan.colocated is not None:
        lines.append("  colocated, a GPU holding one of every PPO role: "
                     + ", ".join(f"{k} {v / g:.1f}" for k, v in plan.colocated.items()))
    if r.num_gpus:
        lines.append("  fits" if not problems else "  does not fit:")
        lines += [f"    {field}: {msg}" for field, msg in problems]
    return lines
