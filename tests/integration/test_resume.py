"""Resume after a real interruption: SIGKILL a stage after its first checkpoint, then re-run it."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from orchestration import stage_data
from orchestration.rundir import StageDir, read_metrics
from orchestration.stages import harness, pretrain, sft

pytestmark = pytest.mark.slow
# Dropout on (0.2), so the result also depends on the restored RNG state.
OVERRIDES = ["pretrain.enabled=false", "data.synthetic.num_demonstrations=384", "sft.batch_size=8",
             "sft.epochs=2", "sft.select_by_rm=false"]
EVERY = 4


def _start_interrupted_run(ray_local, config_file):
    """The stage in another driver process on the same Ray instance."""
    script = textwrap.dedent(f"""
        import ray
        ray.init(address={ray_local.get_runtime_context().gcs_address!r})
        from rlhf.config import load_config
        from orchestration.stages import sft
        sft.main(load_config({str(config_file)!r}), checkpoint_every={EVERY})
    """)
    return subprocess.Popen([sys.executable, "-c", script], cwd=os.getcwd(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_killed_stage_resumes_from_its_checkpoint(ray_local, tiny_config, tmp_path):
    cfg = tiny_config(tmp_path / "run", *OVERRIDES)
    stage = StageDir(cfg.output_dir, "sft")
    (tmp_path / "config.yaml").write_text(cfg.to_yaml())
    proc = _start_interrupted_run(ray_local, tmp_path / "config.yaml")
    deadline = time.time() + 240
    while stage.latest_checkpoint() is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # Ray ends the dead driver's Train workers; wait for that, so nothing of it writes any more.
    while ray_local.available_resources().get("CPU", 0) < 2 and time.time() < deadline:
        time.sleep(0.2)
    killed_at = time.time()
    checkpoint = stage.latest_checkpoint()
    assert checkpoint is not None and not stage.is_done(), "the run must be interrupted mid-stage"
    resumed_from = int(checkpoint.name.split("_")[-1])

    summary = sft.main(cfg, resume=True, checkpoint_every=EVERY)
    rows = [r for r in read_metrics(stage.metrics_file) if "demo_loss" in r]
    assert [r["step"] for r in rows] == list(range(1, summary["steps"] + 1))  # each step once
    assert resumed_from >= EVERY and resumed_from < summary["steps"]
    assert all(r["time"] < killed_at for r in rows if r["step"] <= resumed_from)  # kept, not redone
    assert all(r["time"] > killed_at for r in rows if r["step"] > resumed_from)
    assert stage.is_done()

    # The resumed run is the uninterrupted run: same data position, optimizer, schedule and dropout RNG.
    ref_cfg = tiny_config(tmp_path / "ref", *OVERRIDES)
    stage_data.materialise(ref_cfg)
    torch.set_num_threads(2)
    harness.run_local(ref_cfg, "sft", sft.train_loop, section="sft", base=pretrain.base_model(ref_cfg))
    ref = [r for r in read_metrics(StageDir(ref_cfg.output_dir, "sft").metrics_file) if "demo_loss" in r]
    got, want = torch.tensor([r["loss"] for r in rows]), torch.tensor([r["loss"] for r in ref])
    assert torch.allclose(got, want, rtol=1e-3, atol=1e-4), f"max diff {float((got - want).abs().max())}"
