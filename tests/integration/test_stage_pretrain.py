"""Stage 0 on Ray Train (the shared tiny run): the held-out loss falls, and the outputs are there."""
import pytest
import torch
import torch.nn.functional as F

from orchestration import stage_data
from orchestration.rundir import StageDir, read_metrics
from rlhf.collate import pack_text
from rlhf.models import load_policy, load_tokenizer

pytestmark = pytest.mark.slow


def _heldout_loss(model_dir, cfg) -> float:
    """Next-token cross-entropy of the held-out corpus, computed directly (no stage code)."""
    tok, model = load_tokenizer(model_dir), load_policy(model_dir).eval()
    texts = [r.text for r in stage_data.load(cfg, "pretrain", "valid")]
    blocks = pack_text(tok, texts, cfg.pretrain.seq_len)
    with torch.no_grad():
        logits = model(input_ids=blocks).logits
    return float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1)))


def test_pretraining_lowers_the_heldout_loss(tiny_run):
    cfg, results = tiny_run
    summary = results["pretrain"]
    stage = StageDir(cfg.output_dir, "pretrain")
    assert summary["val_loss"] < summary["val_loss_untrained"] - 0.3
    # The reported numbers are the models' real held-out losses.
    assert summary["val_loss"] == pytest.approx(_heldout_loss(stage.final, cfg), rel=1e-4)
    assert summary["val_loss_untrained"] == pytest.approx(_heldout_loss(stage.path / "base", cfg), rel=1e-4)


def test_pretraining_writes_model_metrics_checkpoint_and_config(tiny_run):
    cfg, _ = tiny_run
    stage = StageDir(cfg.output_dir, "pretrain")
    assert stage.is_done() and (stage.final / "tokenizer.json").exists()
    rows = read_metrics(stage.metrics_file)
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == list(range(1, cfg.pretrain.steps + 1))
    assert all(r["tokens_per_s"] > 0 and r["lr"] > 0 for r in rows if "loss" in r)
    assert [r["step"] for r in rows if "val_loss" in r][0] == 0  # the untrained model, before step 1
    assert any(stage.tb_dir.glob("events.out.tfevents.*"))
    assert stage.latest_checkpoint().name == f"step_{cfg.pretrain.steps:08d}"
    assert "pretrain:" in (cfg.output_dir / "config.yaml").read_text()
