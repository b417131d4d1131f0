"""What a finished run's SFT policy and RM can buy, before any PPO: the ceiling on the win rate.

    .venv/bin/python bench/headroom.py RUN_DIR [--samples 16] [--policy DIR] [--rm DIR] [--name NAME]

On the run's held-out evaluation prompts, draws `--samples` T=1 responses of the
SFT policy per prompt and compares selections of them with one more SFT sample
(the report's win rate: gold judge, ties half):
- `sft`: one sample (the noise floor, about 0.5);
- `rm-best-of-n`: the RM's favourite of n samples (what optimising this RM buys
  at KL log n - (n-1)/n; Gao et al. 2022's reference for PPO);
- `mode`: the policy's most frequent response (what sharpening the policy
  alone buys, with no RM);
- `oracle`: the gold labeler's favourite (what the policy's samples contain at all).
Also the RM's pairwise accuracy against gold on these samples, overall and per
task family. Prints the tables; writes bench/results/headroom[-NAME].json.
"""
from __future__ import annotations

import argparse
import collections
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import print_table, write_results  # noqa: E402
from orchestration.reproduce.measures import draw_scored  # noqa: E402
from rlhf.evaluation import win_rate  # noqa: E402
from rlhf.synthetic import parse_prompt  # noqa: E402

SEED = 5


def mode(group: list[tuple]) -> tuple:
    top = collections.Counter(s[0] for s in group).most_common(1)[0][0]
    return next(s for s in group if s[0] == top)


def pair_counts(group: list[tuple]) -> tuple[int, int]:
    """(RM agrees with gold, pairs) over distinct responses with distinct gold scores."""
    right = pairs = 0
    for a, b in itertools.combinations(group, 2):
        if a[0] != b[0] and a[1] != b[1]:
            pairs += 1
            right += (a[1] > b[1]) == (a[2] > b[2])
    return right, pairs


def selections(groups: list[list[tuple]]) -> dict[str, list[float]]:
    """Gold score per prompt of each selection rule; group[0] is held back as the SFT reference."""
    pool = [g[1:] for g in groups]
    out = {"sft": [p[0][1] for p in pool]}
    n = 1
    while 2 * n <= len(pool[0]):
        n *= 2
        out[f"rm-best-of-{n}"] = [max(p[:n], key=lambda s: s[2])[1] for p in pool]
    out["mode"] = [mode(p)[1] for p in pool]
    out["oracle"] = [max(s[1] for s in p) for p in pool]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--policy", help="policy to sample (default: RUN/sft/final)")
    ap.add_argument("--rm", help="reward model (default: RUN/rm/final)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--name", help="suffix of the results file")
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    run = Path(a.run_dir).resolve()
    policy = Path(a.policy or run / "sft" / "final")
    rm = Path(a.rm or run / "rm" / "final")
    prompts = sorted({json.loads(line)["prompt"] for line in (run / "eval" / "samples.jsonl").open()})
    groups = draw_scored(policy, rm, prompts, a.samples, a.max_new_tokens, seed=SEED)
    ref = [g[0][1] for g in groups]
    rows = []
    for name, gold in selections(groups).items():
        rows.append({"selection": name, "gold": sum(gold) / len(gold),
                     "exact": sum(x == 1.0 for x in gold) / len(gold), "win_vs_sft": win_rate(gold, ref)})
    print_table(f"{run.name}: {len(prompts)} held-out prompts, {a.samples} samples each", rows,
                ["selection", "gold", "exact", "win_vs_sft"])
    by_family: dict[str, list] = collections.defaultdict(list)
    for p, g in zip(prompts, groups):
        by_family[parse_prompt(p).family].append(g)
    fam_rows = []
    for fam, gs in sorted(by_family.items()):
        right, pairs = map(sum, zip(*(pair_counts(g) for g in gs)))
        sel = selections(gs)
        fam_rows.append({"family": fam, "prompts": len(gs), "rm_accuracy": right / max(pairs, 1),
                         **{k: sum(v) / len(v) for k, v in sel.items() if k in ("sft", "mode", "rm-best-of-4")}})
    right, pairs = map(sum, zip(*(pair_counts(g) for g in groups)))
    print_table(f"RM pairwise accuracy on these samples: {right / pairs:.3f} ({pairs} pairs); by family",
                fam_rows, ["family", "prompts", "rm_accuracy", "sft", "mode", "rm-best-of-4"])
    write_results(f"headroom{'-' + a.name if a.name else ''}", {
        "command": " ".join(sys.argv), "run_dir": str(run), "policy": str(policy), "rm": str(rm),
        "samples": a.samples, "prompts": len(prompts), "selections": rows,
        "rm_accuracy": right / pairs, "rm_pairs": pairs, "families": fam_rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
