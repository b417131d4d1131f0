"""K-way rankings of a policy's own T=1 samples by the noisy labeler (the paper's comparison data).

    .venv/bin/python bench/policy_comparisons.py POLICY_DIR N OUT.jsonl [--seed 1000]

`SyntheticSuite.comparisons(sampler=...)` on N training prompts (another suite
seed than the run's, so other prompts than its corruption rankings), K in [4, 9],
responses sampled from POLICY_DIR. Appending OUT to a run's
`data/comparisons_train.jsonl` before `instructray rm` trains the RM on both
(docs/experiments.md, "What the SFT policy and RM can buy").
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
from rlhf.sampling import sample_and_score  # noqa: E402
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

    def sampler(prompts: list[str]) -> list[str]:
        ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        with torch.no_grad():
            return sample_and_score(policy, tok, ids, lambda c: c.responses, chunk_size=512,
                                    max_new_tokens=a.max_new_tokens, seed=11)

    start = time.perf_counter()
    records = SyntheticSuite(a.seed).comparisons("train", a.n, 4, 9, sampler=sampler)
    write_jsonl(records, a.out)
    print(f"{a.out}: {len(records)} rankings of {a.n} prompts in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
