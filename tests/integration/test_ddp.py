"""2 Ray Train workers (DDP, gloo) follow the 1-worker loss curve and end with identical weights."""
import pytest
import torch
from safetensors.torch import load_file

from orchestration import stage_data
from orchestration.rundir import StageDir, read_metrics
from orchestration.stages import harness, pretrain, sft

pytestmark = pytest.mark.slow


def test_two_workers_match_one_worker(tiny_run, tmp_path):
    cfg, results = tiny_run  # its SFT ran on 2 workers, dropout off, global batch sft.batch_size
    assert cfg.sft.num_workers == 2 and cfg.sft.resid_pdrop == 0.0
    checksums = results["sft"]["weights_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]  # the workers' weights are identical

    one = cfg.model_copy(update={"run": cfg.run.model_copy(update={"output_dir": str(tmp_path)})})
    stage_data.materialise(one)
    torch.set_num_threads(2)
    harness.run_local(one, "sft", sft.train_loop, section="sft", base=pretrain.base_model(cfg))

    two_rows = [r for r in read_metrics(StageDir(cfg.output_dir, "sft").metrics_file) if "demo_loss" in r]
    one_rows = [r for r in read_metrics(StageDir(tmp_path, "sft").metrics_file) if "demo_loss" in r]
    assert [r["step"] for r in two_rows] == [r["step"] for r in one_rows]
    two, one_ = torch.tensor([r["loss"] for r in two_rows]), torch.tensor([r["loss"] for r in one_rows])
    assert float((two[0] - two[-1])) > 0.1  # the curve moves, so agreeing means something
    assert torch.allclose(two, one_, rtol=1e-3, atol=1e-4), f"max diff {float((two - one_).abs().max())}"
    # Same data, same averaged gradients: the trained weights agree too.
    w2 = load_file(StageDir(cfg.output_dir, "sft").path / "epochs" / "epoch_002" / "model.safetensors")
    w1 = load_file(StageDir(tmp_path, "sft").final / "model.safetensors")
    assert all(torch.allclose(w2[k], w1[k], atol=1e-4) for k in w1)
