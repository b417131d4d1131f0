"""Stage 3: PPO-ptx against the reward model (and plain PPO for the comparison)."""
from __future__ import annotations

import logging
from pathlib import Path

from orchestration import stage_data
from orchestration.cluster import connect
from orchestration.ppo.trainer import PPOInputs, PPOTrainer
from orchestration.rundir import StageDir
from rlhf.collate import pack_text
from rlhf.config import Config
from rlhf.models import load_tokenizer
from rlhf.synthetic import SyntheticSuite

log = logging.getLogger(__name__)


def runs(cfg: Config) -> list[tuple[str, float]]:
    """(stage name, ptx coefficient): the configured run, plus plain PPO when comparing."""
    out = [("ppo", cfg.ppo.ptx_coef)]
    if cfg.ppo.compare_ptx and cfg.ppo.ptx_coef > 0:
        out.append(("ppo_noptx", 0.0))
    return out


def init_policy(cfg: Config) -> Path:
    """PPO starts from (and is KL-anchored to) the PPO-init SFT model, else the SFT model."""
    return StageDir(cfg.output_dir, "ppo_init_sft" if cfg.ppo_init_sft.enabled else "sft").final


def inputs(cfg: Config) -> PPOInputs:
    policy, rm = init_policy(cfg), StageDir(cfg.output_dir, "rm").final
    for what, path in (("policy", policy), ("reward model", rm)):
        if not (path / "COMPLETE").exists():
            raise FileNotFoundError(f"ppo: no {what} at {path}; run the earlier stages first "
                                    f"(instructray run, or instructray sft / rm)")
    stage_data.materialise(cfg)
    tok = load_tokenizer(policy)
    prompts = [r.prompt for r in stage_data.load(cfg, "prompts", "train", tokenizer=tok)]
    texts = [r.text for r in stage_data.load(cfg, "pretrain", "train")]
    blocks = pack_text(tok, texts, cfg.ptx_block_tokens)
    gold, probe = None, ()
    if cfg.data.source == "synthetic":
        syn = cfg.data.synthetic
        gold = SyntheticSuite(syn.seed, syn.labeler_agreement, syn.demo_noise, syn.families).score
        test = [r.prompt for r in stage_data.load(cfg, "prompts", "test", tokenizer=tok)]
        probe = tuple(test[:cfg.ppo.probe_prompts])
    return PPOInputs(policy=policy, reward_model=rm, tokenizer=tok, prompts=prompts,
                     ptx_blocks=blocks, gold_scorer=gold, probe_prompts=probe)


def main(cfg: Config, resume: bool = False) -> list[Path]:
    connect(cfg)
    data = inputs(cfg)
    finals = []
    for name, ptx_coef in runs(cfg):
        stage = StageDir(cfg.output_dir, name)
        if stage.is_done():
            log.info("%s: already complete at %s", name, stage.final)
            finals.append(stage.final)
            continue
        if not resume and stage.latest_checkpoint() is not None:
            raise RuntimeError(f"{name}: checkpoints from an earlier run are in {stage.checkpoints}; "
                               f"pass --resume to continue, or remove {stage.path} to start over")
        trainer = PPOTrainer(cfg, stage, data, ptx_coef)
        try:
            finals.append(trainer.run(resume=resume))
        finally:
            trainer.shutdown()
    return finals
