"""K-way rankings of a policy's own T=1 samples by the noisy labeler (the paper's comparison data).

    .venv/bin/python bench/policy_comparisons.py POLICY_DIR N OUT.jsonl [--seed 1000]

`SyntheticSuite.comparisons(sampler=...)` on N training prompts, K in [4, 9],
responses sampled from POLICY_DIR: what `data.synthetic.policy_comparisons` makes
inside the RM stage, here for any policy (e.g. a PPO one) and any suite seed.
Appending OUT to a run's `data/comparisons_train.jsonl` before `instructray rm`
trains the RM on both (docs/experiments.md).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from rlhf.data import write_jsonl  # noqa: E402
from rlhf.models import load_policy, load_tokenizer  # noqa: E402
from rlhf.sampling import text_sampler  # noqa: E402
from rlhf.synthetic import SyntheticSuite  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("policy_dir")
    ap.add_argument("n", type=int)
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    tok, policy = load_tokenizer(a.policy_dir), load_policy(a.policy_dir).eval()
    sampler = text_sampler(policy, tok, max_new_tokens=a.max_new_tokens, seed=11)

    start = time.perf_counter()
    records = SyntheticSuite(a.seed).comparisons("train", a.n, 4, 9, sampler=sampler)
    write_jsonl(records, a.out)
    print(f"{a.out}: {len(records)} rankings of {a.n} prompts in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
