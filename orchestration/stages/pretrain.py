"""Stage 0 (tiny only): causal-LM pretraining of the factory's tiny GPT-2 on the built-in corpus.

So the base model is a language model that knows the prompt format and the
words, not noise; solving the tasks is left to SFT and RL. The held-out LM
loss is measured before the first step (the untrained model) and after every
pass over the corpus.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from orchestration import stage_data
from orchestration.rundir import StageDir
from orchestration.stages import checkpointing, harness, training
from rlhf.collate import LMBatch, lm_batch, pack_text
from rlhf.config import Config
from rlhf.data import TextRecord
from rlhf.forward import policy_logits
from rlhf.losses import ptx_lm_loss
from rlhf.masked import global_share
from rlhf.models import load_policy, load_tokenizer
from rlhf.synthetic import tokenizer_training_text
from rlhf.tiny import make_tiny_base

logger = logging.getLogger(__name__)
STAGE = "pretrain"
EVAL_BATCH = 64  # rows per forward pass when measuring held-out loss


def tiny_base_dir(cfg: Config) -> Path:
    return StageDir(cfg.output_dir, STAGE).path / "base"


def ensure_tiny_base(cfg: Config) -> Path:
    """The untrained tiny model and its tokenizer (deterministic in the seed), built once."""
    out = tiny_base_dir(cfg)
    if (out / "model.safetensors").exists():
        return out
    if cfg.data.source == "synthetic":
        texts = tokenizer_training_text(cfg.data.synthetic.seed)
    else:  # a tokenizer for the user's text: train it on their pretraining split
        texts = [r.text for r in stage_data.load(cfg, "pretrain", "train")]
    t = cfg.model.tiny
    return make_tiny_base(out, texts, vocab_size=t.vocab_size, seed=cfg.run.seed, n_layer=t.n_layer,
                          n_head=t.n_head, n_embd=t.n_embd, n_positions=t.n_positions or cfg.model.context_length)


def base_model(cfg: Config) -> str:
    """The model SFT starts from: stage 0's result for the tiny model, else `model.policy`."""
    if cfg.model.policy != "tiny":
        return cfg.model.policy
    if not cfg.pretrain.enabled:
        return str(ensure_tiny_base(cfg))  # an untrained base: fast smoke runs and tests
    stage = StageDir(cfg.output_dir, STAGE)
    if not stage.is_done():
        raise RuntimeError(f"{stage.final} is missing: run stage 0 first (instructray pretrain)")
    return str(stage.final)


def lm_loss(model, batch: LMBatch) -> tuple[torch.Tensor, float]:
    """Mean next-token loss over the batch's targets, and how many targets there were."""
    logits = policy_logits(model, batch.input_ids, batch.attention_mask)
    return ptx_lm_loss(logits, batch.input_ids, batch.loss_mask), float(batch.loss_mask[:, 1:].sum())


@torch.no_grad()
def heldout_loss(ctx: harness.WorkerContext, model, batches: list[LMBatch]) -> float:
    """Target-weighted mean loss over batches split between the workers (eval mode)."""
    model = harness.unwrap(model)  # no DDP: workers may hold different numbers of batches
    was_training = model.training
    model.eval()
    total = count = 0.0
    for (b,), real in ctx.forward_chunks(batches, 1):  # as many forwards on each worker under FSDP
        with ctx.compute():
            loss, n = lm_loss(model, b.to(ctx.device))
        if real:
            total, count = total + float(loss) * n, count + n
    model.train(was_training)
    total, count = ctx.all_sum([total, count])
    return total / count


def blocks_of(cfg: Config, tokenizer, split: str, seq_len: int) -> torch.Tensor:
    texts = [r.text for r in stage_data.load(cfg, "pretrain", split) if isinstance(r, TextRecord)]
    return pack_text(tokenizer, texts, seq_len)


def train_loop(ctx: harness.WorkerContext, base: str) -> dict:
    cfg, pc = ctx.cfg, ctx.cfg.pretrain
    tokenizer = load_tokenizer(base)
    model = load_policy(base)
    train = blocks_of(cfg, tokenizer, "train", pc.seq_len)
    valid = [lm_batch(b) for b in blocks_of(cfg, tokenizer, "valid", pc.seq_len).split(EVAL_BATCH)]
    per_epoch = len(train) // pc.batch_size
    trainer, state, progress = training.start_training(ctx, model, pc.lr, pc.steps, pc.final_lr_fraction, desc=STAGE)
    model = trainer.model
    if state.step == 0:
        state.extra["val_loss_untrained"] = heldout_loss(ctx, model, valid)
        progress.log(0, val_loss=state.extra["val_loss_untrained"], epoch=0)

    while state.step < pc.steps:
        rows = ctx.shard(harness.stream_batch(len(train), pc.batch_size, cfg.run.seed, state.step))
        parts = [lm_batch(train[part]).to(ctx.device) for part in training.micro_batches(rows, pc.micro_batch_size)]
        n = sum(float(b.loss_mask[:, 1:].sum()) for b in parts)
        _, n_all = ctx.all_sum([0.0, n])

        def part_loss(batch: LMBatch):  # its targets' share of the global batch's
            loss, k = lm_loss(model, batch)
            return loss * global_share(k, n_all, ctx.world), loss.item() * k

        loss_sum = sum(trainer.accumulate(parts, part_loss))
        lr = trainer.scheduler.get_last_lr()[0]
        grad_norm = trainer.step(cfg.optimizer.max_grad_norm)
        loss_all, _ = ctx.all_sum([loss_sum, 0.0])
        state.next_step()
        progress.step(state.step, tokens=n_all, loss=loss_all / n_all, lr=lr, grad_norm=grad_norm,
                      **trainer.metrics())
        end_of_epoch = state.step % per_epoch == 0 or state.step == pc.steps
        if end_of_epoch:  # one pass over the corpus
            state.next_epoch()
            state.extra["val_loss"] = heldout_loss(ctx, model, valid)
            progress.log(state.step, val_loss=state.extra["val_loss"], epoch=state.epoch)
        if end_of_epoch or state.step % ctx.checkpoint_every == 0:
            checkpointing.save_checkpoint(ctx, state, trainer)

    progress.close()
    checkpointing.save_hf(ctx, ctx.stage.final, model, tokenizer)
    return {"val_loss_untrained": state.extra["val_loss_untrained"], "val_loss": state.extra["val_loss"],
            "steps": state.step, "train_blocks": len(train),
            "weights_checksums": ctx.gather(training.weights_checksum(model))}


def main(cfg: Config, resume: bool = False, checkpoint_every: int | None = None) -> dict:
    if cfg.model.policy != "tiny":
        raise ValueError(f"stage 0 pretrains the tiny model only; model.policy is {cfg.model.policy!r}"
                         " (set pretrain.enabled: false)")
    harness.prepare_stage_dir(StageDir(cfg.output_dir, STAGE), resume)
    stage_data.materialise(cfg)
    base = ensure_tiny_base(cfg)
    summary = harness.run_stage(cfg, STAGE, train_loop, cfg.pretrain.num_workers,
                                checkpoint_every=checkpoint_every, base=str(base))
    logger.info("stage 0: held-out LM loss %.3f (untrained) -> %.3f", summary["val_loss_untrained"],
                summary["val_loss"])
    return summary
