"""Stage 2: the reward model on K-way rankings.

Initialised from the SFT model (or `model.reward`) with its unembedding
replaced by a scalar head, and `rm.added_layers` identity blocks on top
(`rlhf.deepen`). A batch is `rm.batch_size` prompts, each with all its K
completions: one score per completion, all C(K, 2) pairs of a prompt scored from them (`rlhf.losses.rm_ranking_loss`). A prompt and its K
completions are packed together, several rankings to a row (`rlhf.collate.collate_rankings`):
the same scores as K forward passes, with the prompt computed once. One epoch, cosine to
10%. Validation: pairwise accuracy on held-out rankings (the labelers' noisy
ones and, for the synthetic task, the gold labeler's noiseless ones). Last,
the bias that makes held-out labeler demonstrations score 0 on average.
The PPO value model is initialised from this RM.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from orchestration import stage_data
from orchestration.rundir import StageDir
from orchestration.stages import checkpointing, harness, training
from rlhf.collate import RankingBatch, TokenLimits, collate_encoded, collate_rankings, encode_comparisons, \
    encode_demonstrations
from rlhf.config import Config
from rlhf.data import load_records, write_jsonl
from rlhf.deepen import add_layers
from rlhf.losses import rm_bias, rm_ranking_loss
from rlhf.masked import global_share
from rlhf.models import ScalarModel, load_policy, load_tokenizer
from rlhf.sampling import text_sampler
from rlhf.seeds import derive_seed
from rlhf.tiny import set_residual_dropout

logger = logging.getLogger(__name__)
STAGE = "rm"
EVAL_PROMPTS = 32  # prompts per forward pass in validation
POLICY_RANKINGS = "policy_comparisons.jsonl"


def init_path(cfg: Config) -> str:
    """`model.reward` if set, else the SFT model (the paper: SFT init gives similar results)."""
    if cfg.model.reward:
        return cfg.model.reward
    sft = StageDir(cfg.output_dir, "sft")
    if not sft.is_done():
        raise RuntimeError(f"{sft.final} is missing: run SFT first (instructray sft) or set model.reward")
    return str(sft.final)


def rm_scores(model, batch: RankingBatch) -> torch.Tensor:
    """One score per completion, read at its last token (works through DDP, which wraps forward)."""
    return model(batch.input_ids, batch.attention_mask, batch.position_ids).flatten()[batch.score_index]


@torch.no_grad()
def ranking_accuracy(ctx: harness.WorkerContext, model, groups: list, pad_id: int) -> dict:
    """Pairwise accuracy and mean loss over held-out rankings, split between the workers."""
    model = harness.unwrap(model).eval()
    correct = pairs = loss_sum = prompts = 0.0
    for chunk, real in ctx.forward_chunks(groups, EVAL_PROMPTS):  # as many on each worker under FSDP
        batch = collate_rankings(chunk, pad_id).to(ctx.device)
        with ctx.compute():
            scores = rm_scores(model, batch)
        if not real:
            continue
        loss, stats = rm_ranking_loss(scores, batch.ranks, batch.group_ids)
        n = len(chunk)
        correct, pairs = correct + stats["accuracy"] * stats["n_pairs"], pairs + stats["n_pairs"]
        loss_sum, prompts = loss_sum + float(loss) * n, prompts + n
    model.train()
    correct, pairs, loss_sum, prompts = ctx.all_sum([correct, pairs, loss_sum, prompts])
    return {"accuracy": correct / max(pairs, 1), "loss": loss_sum / max(prompts, 1), "n_pairs": int(pairs)}


@torch.no_grad()
def demonstration_scores(ctx: harness.WorkerContext, model, encoded: list, pad_id: int) -> list[float]:
    """RM scores of prompt + demonstration (+ EOS) for every demonstration, from all workers."""
    model = harness.unwrap(model).eval()
    out: list[float] = []
    for chunk, real in ctx.forward_chunks(encoded, EVAL_PROMPTS):  # as many on each worker under FSDP
        b = collate_encoded(chunk, pad_id).to(ctx.device)
        with ctx.compute():
            scores = model.score(b.input_ids, b.attention_mask).tolist()
        out += scores if real else []
    model.train()
    return [s for part in ctx.gather(out) for s in part]


def rankings(cfg: Config, tokenizer, split: str, gold: bool = False) -> list:
    """Encoded K-way groups of one split (the noisy labels, or the gold labeler's ranking)."""
    limits = TokenLimits(cfg.model.max_prompt_tokens, cfg.model.max_response_tokens)
    comps = stage_data.load(cfg, "comparisons", split, tokenizer, gold=gold)
    if split == "train" and uses_policy_rankings(cfg):
        comps += load_records(policy_rankings_file(cfg), "comparisons")
    return encode_comparisons(tokenizer, comps, limits)[0]


def uses_policy_rankings(cfg: Config) -> bool:
    return cfg.data.source == "synthetic" and cfg.data.synthetic.policy_comparisons > 0  # its labeler ranks them


def policy_rankings_file(cfg: Config) -> Path:
    return StageDir(cfg.output_dir, STAGE).path / POLICY_RANKINGS


def make_policy_rankings(cfg: Config) -> None:
    """`data.synthetic.policy_comparisons` rankings of the SFT policy's T=1 samples, once per stage.

    The paper's labelers rank samples of its policies; made-up mistakes alone leave the RM
    blind to what the policy itself writes (docs/experiments.md).
    """
    n, out = cfg.data.synthetic.policy_comparisons, policy_rankings_file(cfg)
    if not uses_policy_rankings(cfg) or out.exists():
        return
    sft = StageDir(cfg.output_dir, "sft")
    if not sft.is_done():
        raise RuntimeError(f"{sft.final} is missing: data.synthetic.policy_comparisons ranks its samples")
    tokenizer, policy = load_tokenizer(sft.final), load_policy(sft.final).eval()
    sampler = text_sampler(policy, tokenizer, max_new_tokens=cfg.model.max_response_tokens,
                           seed=derive_seed(cfg.run.seed, "policy comparisons"))
    syn = cfg.data.synthetic
    records = stage_data.synthetic_suite(cfg).comparisons("train", n, syn.k_min, syn.k_max, sampler=sampler)
    partial = out.with_suffix(".partial")
    write_jsonl(records, partial)
    partial.replace(out)  # whole or absent: a resumed stage trains on the same rankings
    logger.info("stage 2: %d rankings of the SFT policy's samples on %d prompts", len(records), n)


def train_loop(ctx: harness.WorkerContext, init: str) -> dict:
    cfg, rc = ctx.cfg, ctx.cfg.rm
    tokenizer = load_tokenizer(init)
    pad = tokenizer.pad_token_id
    model = ScalarModel.from_causal_lm(init, seed=cfg.run.seed)
    add_layers(model.model, rc.added_layers)  # before the trainer wraps or shards it
    set_residual_dropout(model, 0.0)  # the SFT's dropout is not the RM's (the paper gives it none)
    train = rankings(cfg, tokenizer, "train")
    valid = {"noisy": rankings(cfg, tokenizer, "valid"), "gold": rankings(cfg, tokenizer, "valid", gold=True)}
    valid = {name: groups for name, groups in valid.items() if groups}  # no gold outside the synthetic task
    per_epoch = len(train) // rc.batch_size
    total = rc.epochs * per_epoch
    trainer, state, progress = training.start_training(ctx, model, rc.lr, total, rc.final_lr_fraction, desc=STAGE)
    model = trainer.model

    for epoch in range(state.epoch, rc.epochs):
        for idx in harness.epoch_batches(len(train), rc.batch_size, cfg.run.seed, epoch)[state.batch_in_epoch:]:
            mine = ctx.shard(idx)
            parts = [collate_rankings([train[i] for i in part], pad).to(ctx.device)
                     for part in training.micro_batches(mine, rc.micro_batch_size)]
            prompts_all, tok_all = ctx.all_sum([len(mine), sum(b.num_tokens for b in parts)])

            def part_loss(batch: RankingBatch):  # its prompts' share of the global batch's
                loss, stats = rm_ranking_loss(rm_scores(model, batch), batch.ranks, batch.group_ids)
                n = batch.num_prompts
                return (loss * global_share(n, prompts_all, ctx.world),
                        (loss.item() * n, stats["accuracy"] * stats["n_pairs"], stats["n_pairs"]))

            sums = trainer.accumulate(parts, part_loss, size=lambda b: b.num_prompts)
            loss_all, correct_all, pairs_all = ctx.all_sum([sum(s[i] for s in sums) for i in range(3)])
            lr = trainer.scheduler.get_last_lr()[0]
            grad_norm = trainer.step(cfg.optimizer.max_grad_norm)
            state.next_step()
            progress.step(state.step, tokens=tok_all, loss=loss_all / prompts_all, accuracy=correct_all / pairs_all,
                          lr=lr, grad_norm=grad_norm, **trainer.metrics())
            if state.step % ctx.checkpoint_every == 0:
                checkpointing.save_checkpoint(ctx, state, trainer)
        state.next_epoch()
        state.extra["valid"] = {name: ranking_accuracy(ctx, model, groups, pad) for name, groups in valid.items()}
        progress.log(state.step, epoch=state.epoch, **{f"val_{name}_{k}": v for name, r in state.extra["valid"].items()
                                                     for k, v in r.items()})
        checkpointing.save_checkpoint(ctx, state, trainer)

    limits = TokenLimits(cfg.model.max_prompt_tokens, cfg.model.max_response_tokens)
    demos, _ = encode_demonstrations(tokenizer, stage_data.load(cfg, "demonstrations", "valid", tokenizer), limits)
    raw = harness.unwrap(model)
    raw.reward_bias = 0.0
    raw.reward_bias = rm_bias(torch.tensor(demonstration_scores(ctx, model, demos, pad))) if rc.normalize else 0.0
    demo_mean = sum(demonstration_scores(ctx, model, demos, pad)) / len(demos)
    progress.log(state.step, reward_bias=raw.reward_bias, demo_score_mean=demo_mean)
    progress.close()
    checkpointing.save_hf(ctx, ctx.stage.final, model, tokenizer)
    return {"valid": state.extra["valid"], "reward_bias": raw.reward_bias, "demo_score_mean": demo_mean,
            "steps": state.step, "train_prompts": len(train),
            "weights_checksums": ctx.gather(training.weights_checksum(model))}


def main(cfg: Config, resume: bool = False, checkpoint_every: int | None = None) -> dict:
    harness.prepare_stage_dir(StageDir(cfg.output_dir, STAGE), resume)
    stage_data.materialise(cfg)
    make_policy_rankings(cfg)
    summary = harness.run_stage(cfg, STAGE, train_loop, cfg.rm.num_workers,
                                checkpoint_every=checkpoint_every, init=init_path(cfg))
    logger.info("stage 2: held-out pairwise accuracy %s; reward bias %.3f",
                {k: round(v["accuracy"], 4) for k, v in summary["valid"].items()}, summary["reward_bias"])
    return summary
