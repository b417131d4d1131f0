"""`data.source: public`: the real public stand-ins for every stage, from one folder.

The folder (`data.public_root`) holds each set in its own published file, at
these paths:

| path | set | becomes |
|---|---|---|
| `stanford_alpaca/seed_tasks.jsonl` | Alpaca's 175 seed tasks | demonstrations |
| `self_instruct/user_oriented_instructions.jsonl` | Self-Instruct's 252 user instructions | demonstrations |
| `hh-rlhf/harmless-base_test.jsonl.gz` | Anthropic HH-RLHF, harmless | K = 2 comparisons |
| `alpaca_eval/annotations_text_davinci_003_vs_gpt4_turbo.json` | AlpacaEval AI-feedback pairs | K = 2 comparisons (soft labels) |
| `truthfulqa/TruthfulQA.csv` | TruthfulQA | K-way rankings (correct above incorrect), K <= 9 |
| `tinyshakespeare/input.txt` | Tiny Shakespeare | pretraining / ptx text |

PPO's prompts are the prompts of all demonstrations and comparisons. Each
adapter is in `rlhf.data.adapters`; the stage splits them 80/10/10 by prompt.
"""
from __future__ import annotations

from pathlib import Path

from rlhf.data import adapters
from rlhf.data.formats import PromptRecord, Record

FILES = {
    "alpaca_seed": "stanford_alpaca/seed_tasks.jsonl",
    "self_instruct": "self_instruct/user_oriented_instructions.jsonl",
    "hh_rlhf": "hh-rlhf/harmless-base_test.jsonl.gz",
    "alpaca_eval": "alpaca_eval/annotations_text_davinci_003_vs_gpt4_turbo.json",
    "truthfulqa": "truthfulqa/TruthfulQA.csv",
    "tinyshakespeare": "tinyshakespeare/input.txt",
}


def missing_public_files(root: str | Path) -> list[str]:
    return [rel for rel in FILES.values() if not (Path(root) / rel).exists()]


def public_records(root: str | Path) -> dict[str, list[Record]]:
    """Kind ("demonstrations", "comparisons", "prompts", "pretrain") -> records of all the sets."""
    f = {name: Path(root) / rel for name, rel in FILES.items()}
    demos = adapters.alpaca_seed_tasks(f["alpaca_seed"]) + adapters.self_instruct(f["self_instruct"])
    comparisons = (adapters.hh_rlhf(f["hh_rlhf"]) + adapters.alpaca_eval(f["alpaca_eval"])
                   + adapters.truthfulqa(f["truthfulqa"]))
    prompts = list(dict.fromkeys(r.prompt for r in (*demos, *comparisons)))
    return {"demonstrations": demos, "comparisons": comparisons,
            "prompts": [PromptRecord(p) for p in prompts], "pretrain": adapters.tinyshakespeare(f["tinyshakespeare"])}
