"""`instructray run`: the enabled steps in order; a step whose result is complete is skipped.

Steps: stage 0 (tiny pretraining), stage 1 (SFT), stage 2 (RM), the SFT model
selection by RM score (it needs the RM, which is initialised from the SFT
model), the PPO-init SFT, stage 3 (PPO-ptx, and plain PPO for the comparison),
and the evaluation with its report.
`resume` continues an interrupted step from its last checkpoint; without it an
unfinished step starts over.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Callable

from orchestration.rundir import StageDir, write_run_config
from orchestration.stages import evaluate, ppo, pretrain, rm, sft
from rlhf.config import Config, require_trainable

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Step:
    name: str
    enabled: Callable[[Config], bool]
    done: Callable[[Config], bool]
    run: Callable[[Config, bool], dict]


def stage_done(name: str) -> Callable[[Config], bool]:
    return lambda cfg: StageDir(cfg.output_dir, name).is_done()


def selection_done(cfg: Config) -> bool:
    return (StageDir(cfg.output_dir, "sft").path / sft.SELECTION).exists()


STEPS: list[Step] = [
    Step("pretrain", lambda c: c.pretrain.enabled, stage_done("pretrain"),
         lambda c, resume: pretrain.main(c, resume=resume)),
    Step("sft", lambda c: c.sft.enabled, stage_done("sft"), lambda c, resume: sft.main(c, resume=resume)),
    Step("rm", lambda c: c.rm.enabled, stage_done("rm"), lambda c, resume: rm.main(c, resume=resume)),
    Step("sft_select", lambda c: c.sft.enabled and c.sft.select_by_rm and c.rm.enabled, selection_done,
         lambda c, resume: sft.select_by_rm(c, "sft")),
    Step("ppo_init_sft", lambda c: c.ppo_init_sft.enabled, stage_done("ppo_init_sft"),
         lambda c, resume: sft.main(c, resume=resume, section="ppo_init_sft")),
    Step("ppo", lambda c: c.ppo.enabled, lambda c: all(StageDir(c.output_dir, n).is_done() for n, _ in ppo.runs(c)),
         lambda c, resume: {"finals": [str(f) for f in ppo.main(c, resume=resume)]}),
    Step("eval", lambda c: True, lambda c: False,
         lambda c, resume: {"report": str(evaluate.main(c)["report"])}),
]


def main(cfg: Config, resume: bool = False, steps: list[Step] | None = None) -> dict:
    """Run the steps; returns {step: summary with its wall time} and writes it to `<run>/pipeline.json`."""
    require_trainable(cfg)  # before anything is written: a refused value must not leave a half-made run
    write_run_config(cfg)
    results: dict[str, dict] = {}
    for step in steps or STEPS:
        if not step.enabled(cfg):
            continue
        if step.done(cfg):
            logger.info("%s: already complete, skipped", step.name)
            continue
        start = time.perf_counter()
        results[step.name] = {**step.run(cfg, resume), "wall_s": time.perf_counter() - start}
        logger.info("%s: done in %.1f s", step.name, results[step.name]["wall_s"])
    (cfg.output_dir / "pipeline.json").write_text(json.dumps(results, indent=1))
    return results
