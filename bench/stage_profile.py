"""Where an SFT or RM step of the default run goes: a profile of the stage's own loop.

    .venv/bin/python bench/stage_profile.py [--stage sft|rm] [--examples N] [key=value ...]

Runs a short stage 0 and then the chosen stage's training loop in this process
(`harness.run_local`, the loop Ray Train runs on each worker, with the worker's 2
threads) on configs/tiny.yaml with N training examples and one epoch, under cProfile,
and splits the loop's wall time into forward (validation's too), backward, the optimizer step (clipping
and Adam), batch building, checkpoints, progress/metrics logging and the rest. It
also counts the step's arithmetic (6 x parameters x attended tokens) against the time.
Prints a table and writes bench/results/stage_profile_<stage>.json.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import print_table, write_results  # noqa: E402
from orchestration import stage_data  # noqa: E402
from orchestration.rundir import StageDir  # noqa: E402
from orchestration.stages import checkpointing, harness, pretrain, rm, sft, training  # noqa: E402
from rlhf.collate import collate_rankings  # noqa: E402
from rlhf.config import load_config  # noqa: E402
from rlhf.forward import policy_logits  # noqa: E402
from rlhf.models import ScalarModel, load_policy  # noqa: E402

# Part of the step -> the functions whose cumulative time it is.
PARTS = {
    "forward": [policy_logits, rm.rm_scores],
    "backward": [torch.Tensor.backward],
    "optimizer step": [training.optimizer_step],
    "batch building": [sft.micro_parts, collate_rankings],
    "checkpoints": [checkpointing.save_checkpoint],
    "progress and metrics": [training.Progress.step],
}


def cumulative(stats: pstats.Stats, fn) -> float:
    code = fn.__code__
    return sum(v[3] for (file, line, name), v in stats.stats.items()
               if file == code.co_filename and line == code.co_firstlineno and name == code.co_name)


class TokenCount:
    """Attended tokens of every step, as the loop reports them to its progress bar."""

    def __init__(self) -> None:
        self.total, self._step = 0.0, training.Progress.step

    def __enter__(self):
        def step(progress, step, tokens, **metrics):
            self.total += tokens
            return self._step(progress, step, tokens, **metrics)
        training.Progress.step = step
        return self

    def __exit__(self, *exc) -> None:
        training.Progress.step = self._step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage", choices=["sft", "rm"], default="sft")
    ap.add_argument("--examples", type=int, default=2400, help="training demonstrations / rankings")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    torch.set_num_threads(2)  # a Ray Train worker's share of the 2 cores
    out = Path(tempfile.mkdtemp(prefix="stage_profile_"))
    count = "num_demonstrations" if args.stage == "sft" else "num_comparisons"
    cfg = load_config("tiny", [f"run.output_dir={out}", "pretrain.steps=40", "sft.epochs=1", "rm.epochs=1",
                               "sft.select_by_rm=false", "data.synthetic.policy_comparisons=0",
                               f"data.synthetic.{count}={args.examples}", *args.overrides])
    stage_data.materialise(cfg)
    harness.prepare_stage_dir(StageDir(out, "pretrain"), resume=False)
    harness.run_local(cfg, "pretrain", pretrain.train_loop, base=str(pretrain.ensure_tiny_base(cfg)))
    base = pretrain.base_model(cfg)
    if args.stage == "rm":  # the RM starts from the SFT model, as in the pipeline
        harness.run_local(cfg, "sft", sft.train_loop, section="sft", base=base)
        loop, kwargs = rm.train_loop, {"init": str(StageDir(out, "sft").final)}
    else:
        loop, kwargs = sft.train_loop, {"section": "sft", "base": base}
    harness.prepare_stage_dir(StageDir(out, args.stage), resume=False)

    profile, start = cProfile.Profile(), time.perf_counter()
    profile.enable()
    with TokenCount() as count:
        summary = harness.run_local(cfg, args.stage, loop, **kwargs)
    profile.disable()
    wall = time.perf_counter() - start
    stats = pstats.Stats(profile)

    steps = summary["steps"]
    rows = [{"part": part, "s": sum(cumulative(stats, fn) for fn in fns)} for part, fns in PARTS.items()]
    rows.append({"part": "rest (data loading, validation, saving, setup)", "s": wall - sum(r["s"] for r in rows)})
    for r in rows:
        r |= {"ms per step": 1e3 * r["s"] / steps, "share": r["s"] / wall}
    tokens = count.total
    final = StageDir(out, args.stage).final
    model = load_policy(final) if args.stage == "sft" else ScalarModel.from_pretrained(final)
    params = sum(p.numel() for p in model.parameters())
    flops = 6 * params * tokens
    compute = sum(r["s"] for r in rows if r["part"] in ("forward", "backward", "optimizer step"))
    print_table(f"{args.stage}: {steps} steps in {wall:.1f} s ({steps / wall:.1f} steps/s, 2 threads, in process)",
                rows, ["part", "s", "ms per step", "share"])
    print(f"\narithmetic: 6 x {params / 1e6:.2f} M parameters x {tokens / steps:.0f} attended tokens a step = "
          f"{flops / steps / 1e9:.2f} GFLOP a step; {flops / wall / 1e9:.1f} GFLOP/s over the loop, "
          f"{flops / compute / 1e9:.1f} GFLOP/s over forward + backward + Adam")
    write_results(f"stage_profile_{args.stage}", {
        "stage": args.stage, "examples": args.examples, "steps": steps, "wall_s": wall, "parts": rows,
        "params": params, "tokens": tokens, "gflop_per_step": flops / steps / 1e9,
        "gflops_loop": flops / wall / 1e9, "gflops_compute": flops / compute / 1e9, "overrides": args.overrides})


if __name__ == "__main__":
    main()
