"""Where a finished `instructray run` spent its time: each stage's training loop against the rest.

    .venv/bin/python bench/run_breakdown.py runs/tiny [runs/other ...]

Reads what a run already records (no new run): each stage's wall time from
`pipeline.json` and the time stamps of its `metrics.jsonl`. A stage's loop is
the span of its training steps (PPO: of its iterations, PPO-ptx and plain PPO
apart), widened by one mean step for the step before the first stamp; the rest
of the stage is start-up (Ray Train workers or the PPO actors), data, the RM
stage's sampling of SFT answers, validation and saving. The sum of the loops is
what no overhead work can take below: the default run cannot reach 10 minutes
while its loops alone take longer. Prints a table and writes
bench/results/run_breakdown.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import print_table, write_results  # noqa: E402
from orchestration.rundir import read_metrics  # noqa: E402

LOOPS = {"pretrain": ["pretrain"], "sft": ["sft"], "rm": ["rm"], "ppo": ["ppo", "ppo_noptx"]}


def loop_seconds(metrics: Path) -> float:
    """Span of the training steps' time stamps plus one mean step (the first row is logged after it).

    Steps are the rows with a training `loss`; validation rows (pretraining's, SFT's, the RM's
    per-epoch accuracies) are not steps.
    """
    stamps = sorted(row["time"] for row in read_metrics(metrics) if "loss" in row and "time" in row)
    if len(stamps) < 2:
        return 0.0
    span = stamps[-1] - stamps[0]
    return span * len(stamps) / (len(stamps) - 1)


def breakdown(run: Path) -> list[dict]:
    walls = {stage: rec["wall_s"] for stage, rec in json.loads((run / "pipeline.json").read_text()).items()
             if isinstance(rec, dict) and "wall_s" in rec}
    rows = []
    for stage, wall in walls.items():
        loop = sum(loop_seconds(run / d / "metrics.jsonl") for d in LOOPS.get(stage, []))
        rows.append({"run": str(run), "stage": stage, "wall_s": wall, "loop_s": loop, "rest_s": wall - loop})
    total = {k: sum(r[k] for r in rows) for k in ("wall_s", "loop_s", "rest_s")}
    rows.append({"run": str(run), "stage": "total", **total})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="finished run folders (run.output_dir)")
    args = ap.parse_args()
    rows = [row for run in args.runs for row in breakdown(run)]
    for r in rows:
        r["loop share"] = r["loop_s"] / r["wall_s"] if r["wall_s"] else 0.0
    print_table("where the default run's time goes (s)", rows,
                ["run", "stage", "wall_s", "loop_s", "rest_s", "loop share"])
    for r in rows:
        if r["stage"] == "total":
            print(f"{r['run']}: {r['wall_s'] / 60:.1f} min in all; the training loops alone {r['loop_s'] / 60:.1f} min, "
                  f"start-up, data, sampling, validation and saving {r['rest_s'] / 60:.1f}")
    write_results("run_breakdown", {"runs": [str(p) for p in args.runs], "rows": rows})


if __name__ == "__main__":
    main()
