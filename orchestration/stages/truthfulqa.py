"""TruthfulQA MC1/MC2 of every policy, through lm-evaluation-harness in process.

The paper's public-NLP table (the "alignment tax") for a run: `eval.truthfulqa`
names the dataset's CSV; `instructray eval` writes it as local lm-eval tasks
(`rlhf.data.lm_eval_tasks`, under `<run>/eval/lm_eval_tasks/`) and scores each
policy with lm-eval's own Hugging Face model class, not with our scorer, so the
figures are the harness's. Needs the `eval` extra (`pip install -e '.[eval]'`).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from orchestration.rundir import StageDir
from rlhf.config import Config, ConfigError
from rlhf.data.lm_eval_tasks import DATA_FILE, TASKS, write_truthfulqa_tasks
from rlhf.models import load_policy, load_tokenizer

log = logging.getLogger(__name__)
BATCH_SIZE = 16


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ConfigError(f"eval.truthfulqa: needs lm-evaluation-harness ({e}); "
                          "install the extra: pip install -e '.[eval]'") from e
    return lm_eval, HFLM, TaskManager


def chance(tasks_dir: Path) -> dict[str, float]:
    """What a model with equal likelihood for every answer scores (MC2: the share of correct answers)."""
    rows = [json.loads(line) for line in (tasks_dir / DATA_FILE).read_text().splitlines()]
    return {"mc1": sum(1 / len(r["mc1"]["choices"]) for r in rows) / len(rows),
            "mc2": sum(sum(r["mc2"]["labels"]) / len(r["mc2"]["labels"]) for r in rows) / len(rows)}


def evaluate(cfg: Config, found: dict[str, StageDir], device: torch.device, dtype: torch.dtype) -> dict:
    """{"questions", "chance", "policies": {name: {"mc1", "mc2"}}, "tasks_dir"} for the policies found."""
    lm_eval, HFLM, TaskManager = _lm_eval()
    tasks_dir = write_truthfulqa_tasks(cfg.eval.truthfulqa, cfg.output_dir / "eval" / "lm_eval_tasks",
                                       cfg.eval.truthfulqa_limit)
    manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    names = [TASKS["mc1"], TASKS["mc2"]]
    scores: dict[str, dict[str, float]] = {}
    questions = 0
    for name, stage in found.items():
        tok = load_tokenizer(stage.final)
        model = load_policy(stage.final, dtype=dtype).to(device).eval()
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=BATCH_SIZE, device=str(device),
                  max_length=model.config.n_positions)
        out = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, log_samples=False,
                                      bootstrap_iters=0, random_seed=cfg.run.seed)
        res = out["results"]
        scores[name] = {key: float(res[task]["acc,none"]) for key, task in (("mc1", names[0]), ("mc2", names[1]))}
        questions = int(out["n-samples"][names[0]]["effective"])
        log.info("truthfulqa %s: MC1 %.3f MC2 %.3f on %d questions", name, scores[name]["mc1"],
                 scores[name]["mc2"], questions)
    return {"questions": questions, "chance": chance(tasks_dir), "policies": scores,
            "harness": f"lm-evaluation-harness {lm_eval.__version__}", "tasks_dir": str(tasks_dir)}
