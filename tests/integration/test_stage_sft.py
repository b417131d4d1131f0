"""Stage 1: the response-only loss and the ptx mix (direct calls), and the stage on Ray Train."""
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from orchestration.rundir import StageDir, read_metrics
from orchestration.stages import sft
from orchestration.stages.harness import WorkerContext
from rlhf.collate import TokenLimits, encode_demonstrations
from rlhf.config import Config
from rlhf.data import Demonstration
from rlhf.models import load_policy

DEMOS = [Demonstration("Instruction: copy the words\nInput: red fox\nResponse:", " red fox"),
         Demonstration("Instruction: add the numbers\nInput: 3 + 4\nResponse:", " 7"),
         Demonstration("Instruction: reverse the words\nInput: a b c d\nResponse:", " d c b a")]


def _ctx():
    return WorkerContext(Config(), StageDir("/nonexistent", "sft"))


def _reference_losses(model, tok):
    """Per demonstration: cross-entropy of each response token (and EOS) given all before it."""
    out = []
    for d in DEMOS:
        p = tok(d.prompt, add_special_tokens=False)["input_ids"]
        r = tok(d.response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        logits = model(input_ids=torch.tensor([p + r])).logits[0]
        out += [float(F.cross_entropy(logits[len(p) - 1 + i], torch.tensor(t))) for i, t in enumerate(r)]
    return out


def _encoded(tok):
    encoded, dropped = encode_demonstrations(tok, DEMOS, TokenLimits(64, 16))
    assert dropped == 0
    return encoded


def test_sft_loss_counts_response_tokens_only(tiny_lm, tiny_tokenizer):
    tiny_lm.eval()
    encoded = _encoded(tiny_tokenizer)
    part = sft.SFTPart.of(encoded, torch.zeros((0, 1), dtype=torch.long), tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        loss, stats = sft.sft_loss(_ctx(), tiny_lm, part)
        ref = _reference_losses(tiny_lm, tiny_tokenizer)
    assert float(loss) == pytest.approx(sum(ref) / len(ref), rel=1e-5)
    assert stats["ptx_loss"] == 0.0 and stats["tokens"] == sum(len(ids) for ids, _ in encoded)
    assert part.batch.loss_mask.sum() == len(ref)  # prompt and padding are not targets


def test_sft_loss_mixes_pretraining_text_by_example_share(tiny_lm, tiny_tokenizer):
    tiny_lm.eval()
    blocks = torch.randint(2, len(tiny_tokenizer), (1, 64))
    part = sft.SFTPart.of(_encoded(tiny_tokenizer), blocks, tiny_tokenizer.pad_token_id)
    assert len(part.batch) < len(DEMOS) + 1  # demonstrations share rows as wide as the block
    with torch.no_grad():
        loss, stats = sft.sft_loss(_ctx(), tiny_lm, part)
        ref_demo = _reference_losses(tiny_lm, tiny_tokenizer)
        logits = tiny_lm(input_ids=blocks).logits[0]
        ref_ptx = float(F.cross_entropy(logits[:-1], blocks[0, 1:]))
    f = 1 / 4  # one packed block among four examples
    expected = (1 - f) * sum(ref_demo) / len(ref_demo) + f * ref_ptx
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert stats["ptx_loss"] == pytest.approx(ref_ptx, rel=1e-5)


@pytest.mark.slow
def test_sft_stage_keeps_every_epoch_and_selects_the_final_by_rm(tiny_run):
    cfg, results = tiny_run
    stage = StageDir(cfg.output_dir, "sft")
    epochs = sft.epoch_dirs(stage)
    assert [d.name for d in epochs] == [f"epoch_{e:03d}" for e in range(1, cfg.sft.epochs + 1)]
    assert len(results["sft"]["val_loss"]) == cfg.sft.epochs
    val_rows = [r for r in read_metrics(stage.metrics_file) if "val_loss" in r]
    assert [r["val_loss"] for r in val_rows] == results["sft"]["val_loss"]
    selection = json.loads((stage.path / sft.SELECTION).read_text())
    assert set(selection["rm_score"]) == {d.name for d in epochs}
    assert selection["selected"] == max(selection["rm_score"], key=selection["rm_score"].get)
    chosen = load_file(stage.path / "epochs" / selection["selected"] / "model.safetensors")
    final = load_file(stage.final / "model.safetensors")
    assert chosen.keys() == final.keys() and all(torch.equal(chosen[k], final[k]) for k in chosen)
    assert load_policy(stage.final).config.resid_pdrop == 0.0  # PPO must not inherit SFT's dropout
    train_rows = [r for r in read_metrics(stage.metrics_file) if "demo_loss" in r]
    demos_per_batch = cfg.sft.batch_size - round(cfg.sft.batch_size * cfg.sft.ptx_fraction)  # the rest: ptx rows
    assert cfg.sft.ptx_fraction > 0 and demos_per_batch < cfg.sft.batch_size  # the mix is on (tiny.yaml)
    per_epoch = results["sft"]["train_examples"] // demos_per_batch
    assert all(r["ptx_loss"] > 0 for r in train_rows)
    assert len(train_rows) == results["sft"]["steps"] == cfg.sft.epochs * per_epoch
