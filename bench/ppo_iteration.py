"""PPO iteration: the Ray system against the plain single-process loop, in the same run.

    .venv/bin/python bench/ppo_iteration.py [--quick] [--presets tiny small] [--iterations N]

For each preset (configs/tiny.yaml, configs/small.yaml): untrained policy and RM
of the preset's shape (bench.common.build_models, EOS made unreachable so every
response is exactly max_response_tokens long on both sides), the same prompts
and ptx blocks in the same order, then
- ours: `PPOTrainer.step` on a local `ray.init(num_cpus=2)` (the preset's
  generators and learners, threads as `rlhf.placement` gives them), after one warm-up iteration;
  ptx seconds = learn - learn of one extra iteration with the ptx term off;
- ours async: the same with `ppo.async_rollouts` (rollout k+1 sampled while the learners
  train on rollout k); seconds per phase are the driver's, so generate is only its wait;
- plain: bench/plain_loop.py (HF generate, sequential scoring, one process,
  torch's default threads), after one warm-up iteration.
Prints seconds per phase, episodes/s, tokens/s and the ratio; writes
bench/results/ppo_iteration.json. A full run takes ~15 min on 2 cores.
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import (build_models, load_average, print_table, ptx_blocks, start_local_ray,  # noqa: E402
                          synthetic_prompts, write_results)
from bench.plain_loop import PlainPPO  # noqa: E402

PHASES = ["generate", "score", "learn", "ptx", "sync"]
TIMED = [p for p in PHASES if p != "ptx"]  # a step's own timers (ptx is inside learn)
ITERATIONS = {"tiny": 3, "small": 2}
QUICK = {"tiny": ["ppo.batch_size=32", "ppo.minibatch_size=4"],
         "small": ["ppo.batch_size=16", "ppo.minibatch_size=4", "model.max_response_tokens=16"]}


def summarise(system: str, preset: str, rows: list[dict], ptx_s: float) -> dict:
    """Means over the measured iterations."""
    mean = lambda key: statistics.mean(r.get(key, 0.0) for r in rows)  # noqa: E731  (async: no sync)
    total = mean("seconds_total")
    out = {"preset": preset, "system": system, "iterations": len(rows), "episodes": rows[0]["episodes"],
           "tokens": rows[0]["tokens"], "s_per_iteration": total,
           "episodes_per_s": rows[0]["episodes"] / total, "tokens_per_s": rows[0]["tokens"] / total}
    for p in PHASES:
        out[f"{p}_s"] = ptx_s if p == "ptx" else mean(f"seconds_{p}")
    return out


def bench_inputs(cfg, folder: Path) -> tuple:
    """(models, prompts, ptx blocks) every system here gets: untrained models of cfg's shape
    (EOS unreachable), synthetic prompts, packed pretraining blocks."""
    t = cfg.model.tiny
    models = build_models(folder, t.vocab_size, t.n_layer, t.n_head, t.n_embd,
                          t.n_positions or cfg.model.context_length, seed=cfg.run.seed)
    prompts = synthetic_prompts(models.tokenizer, 4 * cfg.ppo.batch_size, cfg.model.max_prompt_tokens)
    return models, prompts, ptx_blocks(models.tokenizer, cfg.ppo.ptx_seq_len or cfg.model.context_length)


def warm_trainer(cfg, models, prompts: list[str], blocks: torch.Tensor, stage):
    """Our PPOTrainer on these inputs (Ray running), v0 synced and one warm-up iteration done."""
    from orchestration.ppo.trainer import PPOInputs, PPOTrainer

    inputs = PPOInputs(policy=models.policy, reward_model=models.reward, tokenizer=models.tokenizer,
                       prompts=prompts, ptx_blocks=blocks)
    trainer = PPOTrainer(cfg, stage, inputs, ptx_coef=cfg.ppo.ptx_coef)
    try:
        trainer.team.sync()  # v0 to every generator, as PPOTrainer.run does
        trainer.step(0)  # warm-up: actor start-up, first-touch allocations
    except BaseException:
        trainer.shutdown()
        raise
    return trainer


def run_ours(cfg, models, prompts: list[str], blocks: torch.Tensor, iterations: int, root: Path) -> dict:
    import ray

    from orchestration.rundir import StageDir

    start_local_ray(2)
    system = "ours (Ray, async)" if cfg.ppo.async_rollouts else "ours (Ray)"
    trainer = warm_trainer(cfg, models, prompts, blocks, StageDir(root, f"ppo-{int(cfg.ppo.async_rollouts)}"))
    try:
        rows = []
        for k in range(1, iterations + 1):
            m = trainer.step(k)
            total = sum(m.get(f"seconds_{p}", 0.0) for p in TIMED)  # async: no sync phase
            rows.append(m | {"seconds_total": total, "episodes": cfg.ppo.batch_size,
                             "tokens": round(m["tokens_per_second"] * total)})
            print(f"  {system} {Path(cfg.source).stem} iteration {k}: " + ", ".join(
                f"{p} {m.get(f'seconds_{p}', 0.0):.2f}s" for p in TIMED))
        trainer.ptx_coef = 0.0  # one more iteration without the ptx term: what ptx costs
        no_ptx = trainer.step(iterations + 1)
        ptx_s = statistics.mean(r["seconds_learn"] for r in rows) - no_ptx["seconds_learn"]
        return summarise(system, Path(cfg.source).stem, rows, ptx_s)
    finally:
        trainer.shutdown()
        ray.shutdown()


def run_plain(cfg, models, prompts: list[str], blocks: torch.Tensor, iterations: int) -> dict:
    from orchestration.ppo.streams import BlockStream, Stream

    torch.set_num_threads(os.cpu_count() or 1)  # what a plain program gets: every core
    stream, ptx = Stream(prompts, seed=cfg.run.seed), BlockStream(blocks, seed=cfg.run.seed + 1)
    loop = PlainPPO(cfg, models.policy, models.reward, models.tokenizer, cfg.ppo.ptx_coef)
    loop.iteration(stream.take(cfg.ppo.batch_size), ptx, 0)  # warm-up
    rows = []
    for k in range(1, iterations + 1):
        rows.append(loop.iteration(stream.take(cfg.ppo.batch_size), ptx, k))
        print(f"  plain {Path(cfg.source).stem} iteration {k}: " + ", ".join(
            f"{p} {rows[-1].get(f'seconds_{p}', 0):.2f}s" for p in PHASES))
    return summarise("plain loop", Path(cfg.source).stem, rows, statistics.mean(r.get("seconds_ptx", 0.0) for r in rows))


def bench_preset(preset: str, overrides: list[str], iterations: int) -> list[dict]:
    from rlhf.config import load_config

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(preset, [f"run.output_dir={tmp}", "resources.num_cpus=2", *overrides])
        models, prompts, blocks = bench_inputs(cfg, Path(tmp) / "models")
        print(f"{preset}: {models.params / 1e6:.1f}M parameters, batch {cfg.ppo.batch_size}, "
              f"{cfg.model.max_response_tokens} response tokens, {cfg.ppo.num_generators} generator(s), "
              f"{cfg.ppo.num_learners} learner(s); load {load_average()}")
        # one-step off-policy: generators sample the next batch while the learners train
        async_cfg = load_config(preset, [f"run.output_dir={tmp}", "resources.num_cpus=2", *overrides,
                                         "ppo.async_rollouts=true"])
        rows = []
        for run in ("ours", "ours async", "plain"):
            load = load_average()
            row = (run_plain(cfg, models, prompts, blocks, iterations) if run == "plain" else
                   run_ours(async_cfg if run == "ours async" else cfg, models, prompts, blocks, iterations, Path(tmp)))
            rows.append(row | {"params_M": models.params / 1e6, "load_before": load, "load_after": load_average()})
        plain = rows[-1]
        for row in rows:
            row["speedup"] = row["episodes_per_s"] / plain["episodes_per_s"]
        return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: small batches, 1 iteration")
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--iterations", type=int, help="measured iterations per system "
                        f"(default {ITERATIONS}); more average out a noisy machine")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    rows = []
    for preset in args.presets:
        iterations = 1 if args.quick else args.iterations or ITERATIONS.get(preset, 2)
        rows += bench_preset(preset, QUICK.get(preset, []) if args.quick else [], iterations)
    print_table("PPO iteration: seconds per phase (mean over measured iterations)", rows,
                ["preset", "system", "params_M", "episodes", "tokens"] + [f"{p}_s" for p in PHASES]
                + ["s_per_iteration"])
    print_table("PPO iteration: throughput", rows,
                ["preset", "system", "episodes_per_s", "tokens_per_s", "speedup", "load_before", "load_after"])
    write_results("ppo_iteration", {"rows": rows, "note": "ptx_s is inside learn_s; speedup = episodes/s "
                                    "over the plain loop's, same run"}, quick=args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
