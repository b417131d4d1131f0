"""Our PPO against TRL's PPOTrainer, the PPO trainer of the Hugging Face stack, in the same run.

    .venv/bin/python bench/peer_trl.py [--quick] [--presets tiny small]

The first run creates bench/.venv-trl (CPU torch pinned as ours, trl==0.24.0 with its
top-level PPOTrainer, and our transformers version) and reuses it after. For
each preset: the untrained policy of the preset's shape (bench.common.build_models, EOS
unreachable so every response is exactly max_response_tokens long on both sides), the
same prompts, batch, minibatch, response length, one PPO epoch, 2 threads, no ptx; then
- TRL: `PPOTrainer.train` in the venv (bench/peer_trl_run.py), seconds per iteration after
  a warm-up iteration;
- ours: `PPOTrainer.step` on a local `ray.init(num_cpus=2)` (bench/ppo_iteration.run_ours,
  ptx off), after a warm-up iteration.
What differs in the work (kept, not matched): TRL takes the rollout's logprobs from
`generate()`'s scores and steps policy and value with one backward; ours scores the
rollout with a separate forward pass and trains policy and critic in their own actors.
Prints episodes/s of both, the ratio, and each side's seconds per phase (generate, score,
learn; TRL's from marks around the functions its loop calls, bench/peer_trl_run.py);
writes bench/results/peer_trl.json. `--profile` also runs TRL once under torch's
profiler: the share of its time in matrix products, the part no implementation of the
same passes can skip, bounds any speed-up over it at 1 / share (the profiler slows the
small ops more, so the true bound is lower still).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.common import build_models, load_average, print_table, ptx_blocks, synthetic_prompts, write_results  # noqa: E402
from bench.ppo_iteration import ITERATIONS, QUICK, run_ours  # noqa: E402

PHASES = ("generate_s", "score_s", "learn_s")  # seconds per iteration in each phase, both sides
VENV = REPO / "bench" / ".venv-trl"
TRL = "trl==0.24.0"


def trl_python() -> Path:
    """The venv's python, created (once) with TRL and our torch and transformers."""
    python = VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        "-c", str(REPO / "constraints-cpu.txt"), TRL, f"transformers=={version('transformers')}",
                        "torch", "accelerate", "datasets"], check=True)
    return python


def _trl_env() -> dict:
    """Ours minus what would put our venv's packages on the TRL venv's path; offline."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return env | {"TRL_EXPERIMENTAL_SILENCE": "1", "HF_HUB_OFFLINE": "1"}


def run_trl(cfg, policy: Path, prompt_ids: list[list[int]], iterations: int, threads: int,
            profile: bool = False) -> dict:
    p = cfg.ppo
    spec = {"policy": str(policy), "prompt_ids": prompt_ids, "batch_size": p.batch_size,
            "minibatch_size": p.minibatch_size, "response_tokens": cfg.model.max_response_tokens,
            "iterations": iterations, "threads": threads, "kl_coef": p.kl_coef, "lr": p.lr, "profile": profile}
    with tempfile.TemporaryDirectory() as tmp:
        spec_file, out_file = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_file.write_text(json.dumps(spec))
        subprocess.run([str(trl_python()), str(REPO / "bench" / "peer_trl_run.py"), str(spec_file), str(out_file)],
                       check=True, env=_trl_env())
        return json.loads(out_file.read_text())


def bench_preset(preset: str, overrides: list[str], iterations: int, profile: bool) -> list[dict]:
    from rlhf.config import load_config

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(preset, [f"run.output_dir={tmp}", "resources.num_cpus=2", "ppo.ptx_coef=0",
                                   "ppo.ppo_epochs=1", *overrides])
        t = cfg.model.tiny
        models = build_models(Path(tmp) / "models", t.vocab_size, t.n_layer, t.n_head, t.n_embd,
                              t.n_positions or cfg.model.context_length, seed=cfg.run.seed)
        prompts = synthetic_prompts(models.tokenizer, 4 * cfg.ppo.batch_size, cfg.model.max_prompt_tokens)
        ids = [models.tokenizer(q, add_special_tokens=False)["input_ids"] for q in prompts]
        shape = {"preset": preset, "params_M": models.params / 1e6, "episodes": cfg.ppo.batch_size,
                 "minibatch": cfg.ppo.minibatch_size, "response_tokens": cfg.model.max_response_tokens}
        print(f"{preset}: {models.params / 1e6:.1f}M parameters, batch {cfg.ppo.batch_size}, minibatch "
              f"{cfg.ppo.minibatch_size}, {cfg.model.max_response_tokens} response tokens; load {load_average()}")
        load = load_average()
        trl = run_trl(cfg, models.policy, ids, iterations, threads=2)
        trl_row = shape | {"system": f"TRL {trl['trl_version']} PPOTrainer", "load_before": load} | {
            k: trl[k] for k in ("s_per_iteration", "episodes_per_s", *PHASES)}
        if profile:
            prof = run_trl(cfg, models.policy, ids, iterations, threads=2, profile=True)
            trl_row |= {"matmul_share": prof["matmul_share"], "speedup_bound": 1 / prof["matmul_share"]}
        load = load_average()
        ours = run_ours(cfg, models, prompts, ptx_blocks(models.tokenizer, 32), iterations, Path(tmp))
        ours_row = shape | {"system": "ours (Ray)", "load_before": load} | {
            k: ours[k] for k in ("s_per_iteration", "episodes_per_s", *PHASES)}
        for row in (trl_row, ours_row):
            row["vs_trl"] = row["episodes_per_s"] / trl_row["episodes_per_s"]
            row["load_after"] = load_average()
        return [trl_row, ours_row]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: small batches, 1 iteration")
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--profile", action="store_true", help="also TRL's matrix-product share (a bound)")
    args = parser.parse_args(argv)
    rows = []
    for preset in args.presets:
        iterations = 1 if args.quick else ITERATIONS.get(preset, 2)
        rows += bench_preset(preset, QUICK.get(preset, []) if args.quick else [], iterations, args.profile)
    print_table("PPO without ptx: ours against TRL's PPOTrainer (same shapes, 2 threads)", rows,
                ["preset", "system", "params_M", "episodes", "minibatch", "response_tokens", *PHASES,
                 "s_per_iteration", "episodes_per_s", "vs_trl", *(["matmul_share", "speedup_bound"] if args.profile else []),
                 "load_before", "load_after"])
    write_results("peer_trl", {"rows": rows, "note": "vs_trl = episodes/s over TRL's, same run; TRL takes "
                               "rollout logprobs from generate() and steps policy and value in one backward"},
                  quick=args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
