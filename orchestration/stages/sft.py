"""Stage 1: supervised fine-tuning on demonstrations; also the PPO-init SFT (section `ppo_init_sft`).

Paper (Appendix C): residual dropout, cosine decay to 10% with no warmup, loss
on response tokens only; the PPO-init variant mixes pretraining text into
each batch (10%). Each epoch is validated and kept as an HF checkpoint under
`<stage>/epochs/`; `final/` is the last epoch until a reward model exists,
then `select_by_rm` picks the epoch whose T=1 samples the RM scores highest on
validation prompts (the paper's rule).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Sequence

import torch

from orchestration import stage_data
from orchestration.rundir import StageDir, atomic_write_dir
from orchestration.stages import checkpointing, harness, training
from orchestration.stages.pretrain import base_model, heldout_loss
from rlhf.batch import split_evenly
from rlhf.collate import PackedLMBatch, TokenLimits, collate_encoded, encode_demonstrations, pack_lm, pack_text
from rlhf.config import Config, SFTConfig
from rlhf.forward import policy_logits
from rlhf.losses import next_token_nll, ptx_targets
from rlhf.masked import global_share, masked_mean
from rlhf.models import ScalarModel, load_policy, load_tokenizer
from rlhf.sampling import sample_and_score
from rlhf.tiny import set_residual_dropout

logger = logging.getLogger(__name__)
SELECTION = "selection.json"
SAMPLE_CHUNK = 64  # prompts per sampling call during model selection


def limits(cfg: Config) -> TokenLimits:
    return TokenLimits(cfg.model.max_prompt_tokens, cfg.model.max_response_tokens)


def epoch_dirs(stage: StageDir) -> list[Path]:
    return sorted(p for p in (stage.path / "epochs").glob("epoch_*") if (p / "COMPLETE").exists())


@dataclasses.dataclass
class SFTPart:
    """One micro-batch: its demonstrations and pretraining blocks packed into one batch."""
    batch: PackedLMBatch
    demos: int
    blocks: int

    @classmethod
    def of(cls, encoded: Sequence[tuple[list[int], list[int]]], blocks: torch.Tensor, pad: int) -> "SFTPart":
        return cls(pack_lm(encoded, blocks, pad), len(encoded), len(blocks))

    def to(self, device) -> "SFTPart":
        return dataclasses.replace(self, batch=self.batch.to(device))


@dataclasses.dataclass
class SFTTotals:
    """The global batch's counts, which every micro-batch's loss is weighted by."""
    d_all: float     # demonstration targets
    p_all: float     # pretraining targets
    d_rows: float    # demonstrations
    p_rows: float    # pretraining blocks
    tokens: float    # attended tokens


def sft_totals(ctx: harness.WorkerContext, parts: Sequence[SFTPart]) -> SFTTotals:
    """Summed over this worker's micro-batches, then over the workers."""
    d_n = p_n = n = n_ptx = tokens = 0.0
    for part in parts:
        b = part.batch
        d_n, p_n = d_n + float(b.loss_mask[:, 1:].sum()), p_n + float(b.ptx_mask[:, 1:].sum())
        n, n_ptx, tokens = n + part.demos, n_ptx + part.blocks, tokens + b.num_tokens
    return SFTTotals(*ctx.all_sum([d_n, p_n, n, n_ptx, tokens]))


def sft_part_loss(ctx: harness.WorkerContext, model, part: SFTPart, totals: SFTTotals
                  ) -> tuple[torch.Tensor, tuple[float, float]]:
    """One micro-batch's loss, weighted by its share of the global batch, and its (demo, ptx) loss sums.

    One forward pass over both parts (DDP expects one forward per backward).
    """
    b = part.batch
    nll = next_token_nll(policy_logits(model, b.input_ids, b.attention_mask, b.position_ids), b.input_ids)
    d_loss = masked_mean(nll, ptx_targets(b.loss_mask))  # 0 when empty
    p_loss = masked_mean(nll, ptx_targets(b.ptx_mask))
    d_n, p_n = float(b.loss_mask[:, 1:].sum()), float(b.ptx_mask[:, 1:].sum())
    f = totals.p_rows / (totals.d_rows + totals.p_rows)
    loss = ((1 - f) * d_loss * global_share(d_n, totals.d_all, ctx.world)
            + f * p_loss * global_share(p_n, totals.p_all, ctx.world))
    return loss, (d_loss.item() * d_n, p_loss.item() * p_n)


def sft_stats(ctx: harness.WorkerContext, totals: SFTTotals, sums: Sequence[tuple[float, float]]) -> dict:
    """The global batch's losses from every micro-batch's (demo, ptx) loss sums, on every worker."""
    d_sum = p_sum = 0.0
    for d, p in sums:
        d_sum, p_sum = d_sum + d, p_sum + p
    d_sum, p_sum = ctx.all_sum([d_sum, p_sum])
    f = totals.p_rows / (totals.d_rows + totals.p_rows)
    demo_loss, ptx_loss = d_sum / totals.d_all, (p_sum / totals.p_all if totals.p_all else 0.0)
    return {"loss": (1 - f) * demo_loss + f * ptx_loss, "demo_loss": demo_loss,
            "ptx_loss": ptx_loss, "tokens": totals.tokens}


def sft_loss(ctx: harness.WorkerContext, model, part: SFTPart) -> tuple[torch.Tensor, dict]:
    """(1 - f) * demonstration loss (response tokens only) + f * pretraining LM loss.

    f is the pretraining share of the global batch's examples, so each example
    weighs the same; each part is a mean over the global batch's targets. This
    worker's whole share in one forward pass; the stage runs it as micro-batches
    (`sft_part_loss`), which sum to the same.
    """
    totals = sft_totals(ctx, [part])
    loss, sums = sft_part_loss(ctx, model, part, totals)
    return loss, sft_stats(ctx, totals, [sums])


def micro_parts(ctx: harness.WorkerContext, train: list, blocks: torch.Tensor, idx: list[int],
                ptx_idx: list[int], micro_batch_size: int | None, pad: int) -> list[SFTPart]:
    """This worker's share of a batch as micro-batches of at most `micro_batch_size` examples.

    The share (its demonstrations, then its pretraining rows) is cut into consecutive
    pieces; every worker cuts as many as the largest share needs.
    """
    share = [(True, i) for i in ctx.shard(idx)] + [(False, j) for j in ctx.shard(ptx_idx)]
    most = max(len(d) + len(p) for d, p in zip(split_evenly(idx, ctx.world), split_evenly(ptx_idx, ctx.world)))
    parts = []
    for part in training.micro_batches(share, micro_batch_size, most):
        d_rows, p_rows = [i for is_demo, i in part if is_demo], [j for is_demo, j in part if not is_demo]
        parts.append(SFTPart.of([train[i] for i in d_rows], blocks[p_rows], pad).to(ctx.device))
    return parts


def save_policy(ctx: harness.WorkerContext, target: Path, model, tokenizer, dropout: float) -> None:
    """Saved without dropout: it is a training setting, and PPO must not inherit it."""
    set_residual_dropout(harness.unwrap(model), 0.0)
    checkpointing.save_hf(ctx, target, model, tokenizer)
    set_residual_dropout(harness.unwrap(model), dropout)


def train_loop(ctx: harness.WorkerContext, section: str, base: str) -> dict:
    cfg = ctx.cfg
    sc: SFTConfig = getattr(cfg, section)
    tokenizer = load_tokenizer(base)
    model = load_policy(base)
    set_residual_dropout(model, sc.resid_pdrop)
    pad = tokenizer.pad_token_id
    train, _ = encode_demonstrations(tokenizer, stage_data.load(cfg, "demonstrations", "train", tokenizer), limits(cfg))
    valid_enc, _ = encode_demonstrations(tokenizer, stage_data.load(cfg, "demonstrations", "valid", tokenizer), limits(cfg))
    valid = [collate_encoded(valid_enc[i:i + sc.batch_size], pad) for i in range(0, len(valid_enc), sc.batch_size)]
    n_ptx = round(sc.batch_size * sc.ptx_fraction)
    n_demo = sc.batch_size - n_ptx
    blocks = (pack_text(tokenizer, [r.text for r in stage_data.load(cfg, "pretrain", "train")],
                        cfg.ptx_block_tokens) if n_ptx else torch.zeros((0, 1), dtype=torch.long))
    per_epoch = len(train) // n_demo
    total = sc.epochs * per_epoch
    trainer, state, progress = training.start_training(ctx, model, sc.lr, total, sc.final_lr_fraction, desc=section)
    model = trainer.model

    for epoch in range(state.epoch, sc.epochs):
        for idx in harness.epoch_batches(len(train), n_demo, cfg.run.seed, epoch)[state.batch_in_epoch:]:
            ptx_idx = harness.stream_batch(len(blocks), n_ptx, cfg.run.seed, state.step) if n_ptx else []
            parts = micro_parts(ctx, train, blocks, idx, ptx_idx, sc.micro_batch_size, pad)
            totals = sft_totals(ctx, parts)
            # More workers than examples (fsdp only): a worker with none runs a throwaway pass.
            idle = not any(p.demos + p.blocks for p in parts)
            filler = SFTPart.of([train[idx[0]]], blocks[:0], pad).to(ctx.device) if idle else None
            sums = trainer.accumulate(parts, lambda p: sft_part_loss(ctx, model, p, totals),
                                       size=lambda p: p.demos + p.blocks, filler=filler)
            stats = sft_stats(ctx, totals, sums)
            lr = trainer.scheduler.get_last_lr()[0]
            grad_norm = trainer.step(cfg.optimizer.max_grad_norm)
            state.next_step()
            progress.step(state.step, lr=lr, grad_norm=grad_norm, **stats, **trainer.metrics())
            if state.step % ctx.checkpoint_every == 0:
                checkpointing.save_checkpoint(ctx, state, trainer)
        val_loss = heldout_loss(ctx, model, valid)
        state.next_epoch()
        state.extra.setdefault("val_loss", []).append(val_loss)
        progress.log(state.step, val_loss=val_loss, epoch=state.epoch)
        save_policy(ctx, ctx.stage.path / "epochs" / f"epoch_{state.epoch:03d}", model, tokenizer, sc.resid_pdrop)
        checkpointing.save_checkpoint(ctx, state, trainer)

    progress.close()
    save_policy(ctx, ctx.stage.final, model, tokenizer, sc.resid_pdrop)
    return {"val_loss": state.extra["val_loss"], "steps": state.step, "train_examples": len(train),
            "final_epoch": sc.epochs, "weights_checksums": ctx.gather(training.weights_checksum(model))}


@torch.no_grad()
def mean_rm_score(policy, rm: ScalarModel, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int,
                  seed: int) -> float:
    """Mean RM score of one T=1 sample per prompt (same sampler seed for every policy compared)."""
    scores = sample_and_score(policy, tokenizer, prompt_ids,
                              lambda c: rm.score(c.samples.input_ids, c.samples.attention_mask).tolist(),
                              chunk_size=SAMPLE_CHUNK, max_new_tokens=max_new_tokens, seed=seed)
    return float(torch.tensor(scores).mean())


def rm_final(cfg: Config) -> Path:
    return StageDir(cfg.output_dir, "rm").final


def can_select(cfg: Config, section: str = "sft") -> bool:
    return getattr(cfg, section).select_by_rm and StageDir(cfg.output_dir, "rm").is_done()


def select_by_rm(cfg: Config, section: str = "sft") -> dict:
    """Make `final/` the epoch whose samples the RM scores highest on validation prompts."""
    stage = StageDir(cfg.output_dir, section)
    dirs = epoch_dirs(stage)
    tokenizer = load_tokenizer(dirs[-1])
    rm = ScalarModel.from_pretrained(rm_final(cfg)).eval()
    prompts = [r.prompt for r in stage_data.load(cfg, "prompts", "valid", tokenizer)]
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    scores = {d.name: mean_rm_score(load_policy(d).eval(), rm, tokenizer, ids, cfg.model.max_response_tokens,
                                    cfg.run.seed)
              for d in dirs}
    best = max(scores, key=scores.get)
    atomic_write_dir(stage.final, lambda out: shutil.copytree(stage.path / "epochs" / best, out, dirs_exist_ok=True))
    result = {"selected": best, "rm_score": scores, "n_prompts": len(ids)}
    (stage.path / SELECTION).write_text(json.dumps(result, indent=1))
    logger.info("%s: selected %s by RM score %s", section, best, scores)
    return result


def main(cfg: Config, resume: bool = False, section: str = "sft", checkpoint_every: int | None = None) -> dict:
    sc: SFTConfig = getattr(cfg, section)
    harness.prepare_stage_dir(StageDir(cfg.output_dir, section), resume)
    stage_data.materialise(cfg)
    summary = harness.run_stage(cfg, section, train_loop, sc.num_workers, checkpoint_every=checkpoint_every,
                                section=section, base=base_model(cfg))
    if can_select(cfg, section):
        summary["selection"] = select_by_rm(cfg, section)
    return summary
