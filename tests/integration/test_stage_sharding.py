"""Stages 1-2 under resources.strategy, model.dtype, activation checkpointing and micro_batch_size.

Real 2-process gloo groups (`harness.run_processes`, no Ray). One group runs every
variant of a tiny SFT and RM one after another, each in its own stage folder of one
run directory, so the ~15 s process start-up is paid once; the tests then compare
the variants' metrics and saved HF directories:

- FSDP2 against DDP (float32): the same per-step loss and gradient norm, and the same
  final weights to within FSDP_ATOL; also FSDP2 over more workers than a batch has
  examples against one worker. Adam's update ignores a uniform gradient scale,
  so the gradient norm is what catches a mis-weighted loss.
- 4 micro-batches against 1 (also an uneven SFT split with empty micro-batches, FSDP):
  the same, to within MICRO_RTOL / MICRO_ATOL (float32, other summation order).
- bf16 (FSDP's mixed precision with activation checkpointing; DDP's autocast) and
  fp16 (loss scaler): finite, falling, near the float32 curve but not equal to it,
  float32 master weights saved.
- A sharded checkpoint, and a run killed after it and resumed in a new group, which
  repeats the uninterrupted run exactly.
"""
from __future__ import annotations

import json
import os
import time

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from orchestration import stage_data
from orchestration.rundir import StageDir, read_metrics
from orchestration.stages import checkpointing, harness, pretrain, rm, sft, training
from rlhf import dist_checkpoint
from rlhf.models import ScalarModel, load_policy

pytestmark = pytest.mark.slow

WORLD = 2
# float32 tolerances. Measured on the 2-core CPU machine: FSDP vs DDP weights differ by 0
# (gloo sums the two ranks' gradients in the same order); 4 or 9 micro-batches vs one by
# 6e-7 (SFT), 2.7e-6 (SFT, uneven, FSDP) and, on all but ln_f.bias, 2e-6..3.4e-6 (RM), of weights
# that training moved by 2e-3..4e-3.
FSDP_ATOL = 1e-6
MICRO_RTOL, MICRO_ATOL = 1e-4, 2e-6  # per-step loss and gradient norm
MICRO_WEIGHT_ATOL = 2e-5
SPREAD_WEIGHT_ATOL = 5e-5  # 96 steps of batch 1 on 2 FSDP workers against 1 worker
# The ranking loss's gradients over one prompt's scores sum to 0, so the gradient of the
# final LayerNorm's bias (which shifts every score alike) is 0 up to rounding, and Adam
# blows that rounding noise up to steps of ~lr: a parameter no summation order can pin.
RM_NOISE_ONLY = ("transformer.ln_f.bias",)
# No rankings of SFT samples: rm.main makes them, and these runs call the train loops directly.
BASE = ["pretrain.enabled=false", "model.tiny.n_layer=2", "data.synthetic.num_demonstrations=96",
        "sft.epochs=1", "sft.select_by_rm=false", "sft.resid_pdrop=0.0", "sft.num_workers=2",
        "rm.epochs=1", "rm.num_workers=2", "data.synthetic.policy_comparisons=0"]
# name: (stage, overrides, checkpoint_every)
RUNS = {
    "sft_ddp": ("sft", [], None),
    "sft_fsdp": ("sft", ["resources.strategy=fsdp"], None),
    "sft_ddp_micro": ("sft", ["sft.micro_batch_size=2"], None),        # share 8 -> 4 micro-batches
    # 13 demos + 3 ptx rows: shares of 9 and 7 examples, 9 micro-batches each (2 empty on rank 1)
    "sft_uneven": ("sft", ["sft.ptx_fraction=0.2"], None),
    "sft_uneven_fsdp_micro": ("sft", ["sft.ptx_fraction=0.2", "resources.strategy=fsdp",
                                      "sft.micro_batch_size=1"], None),
    # batch 1 over 2 workers: one holds the example, the other runs a throwaway pass
    "sft_spread_fsdp": ("sft", ["resources.strategy=fsdp", "sft.batch_size=1"], None),
    "sft_bf16_fsdp": ("sft", ["resources.strategy=fsdp", "model.dtype=bfloat16",
                              "resources.activation_checkpointing=true"], None),
    "sft_bf16_ddp": ("sft", ["model.dtype=bfloat16", "resources.activation_checkpointing=true"], None),
    "sft_fp16_fsdp": ("sft", ["resources.strategy=fsdp", "model.dtype=float16"], None),
    "sft_resume_ref": ("sft", ["resources.strategy=fsdp", "sft.resid_pdrop=0.2"], 2),
    "rm_ddp": ("rm", [], None),
    "rm_fsdp": ("rm", ["resources.strategy=fsdp"], None),
    "rm_ddp_micro": ("rm", ["rm.micro_batch_size=1"], None),           # share 4 -> 4 micro-batches
    "rm_fsdp_micro": ("rm", ["resources.strategy=fsdp", "rm.micro_batch_size=1"], None),
    "rm_bf16_ddp": ("rm", ["model.dtype=bfloat16"], None),
}
RESUME_EVERY, KILL_AFTER = 2, 4


def _config(tiny_config, root, *overrides):
    return tiny_config(root, *BASE, *overrides)


def _stage_loop(ctx: harness.WorkerContext, stage: str, base: str) -> dict:
    if stage == "sft":
        return sft.train_loop(ctx, section="sft", base=base)
    return rm.train_loop(ctx, init=base)


def _all_runs(ctx: harness.WorkerContext, runs: list, base: str) -> dict:
    """Every variant in turn on this group, each from a freshly seeded worker as a stage starts."""
    for name, cfg, stage, every in runs:
        sub = harness.WorkerContext(cfg, StageDir(cfg.output_dir, name), rank=ctx.rank, world=ctx.world,
                                    device=ctx.device, checkpoint_every=every or harness.DEFAULT_CHECKPOINT_EVERY)
        harness.seed_worker(cfg.run.seed, ctx.rank)
        summary = _stage_loop(sub, stage, base)
        if ctx.is_main:
            (sub.stage.path / harness.SUMMARY).write_text(json.dumps(summary))
        ctx.barrier()
    return {}


def _killed_after_checkpoint(ctx: harness.WorkerContext, base: str, kill_after: int) -> dict:
    """The stage, with every worker dying (no clean-up) right after the checkpoint of step `kill_after`."""
    save = checkpointing.save_checkpoint

    def save_then_die(ctx_, state, trainer):
        save(ctx_, state, trainer)
        if state.step >= kill_after:
            os._exit(17)
    checkpointing.save_checkpoint = save_then_die
    return sft.train_loop(ctx, section="sft", base=base)


@pytest.fixture(scope="module")
def variants(tiny_config, tmp_path_factory):
    """(run root, {name: config}) after all RUNS trained on one 2-process gloo group."""
    root = tmp_path_factory.mktemp("sharding")
    cfgs = {name: _config(tiny_config, root, *overrides) for name, (_, overrides, _) in RUNS.items()}
    first = next(iter(cfgs.values()))
    stage_data.materialise(first)  # the data depend on none of the overrides: one copy for all
    runs = [(name, cfgs[name], stage, every) for name, (stage, _, every) in RUNS.items()]
    harness.run_processes(first, "all", _all_runs, WORLD, runs=runs, base=pretrain.base_model(first))
    return root, cfgs


def _rows(root, name, key="loss"):
    return [r for r in read_metrics(StageDir(root, name).metrics_file) if key in r and "step" in r]


def _curve(root, name, key):
    return torch.tensor([r[key] for r in _rows(root, name, key)], dtype=torch.float64)


def _weights(root, name):
    return load_file(StageDir(root, name).final / "model.safetensors")


def _max_weight_diff(root, a, b, skip=()) -> float:
    wa, wb = _weights(root, a), _weights(root, b)
    assert wa.keys() == wb.keys()
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa if k not in skip)


def _moved(root, name) -> float:
    """How far training moved the weights (so agreeing within a tolerance means something)."""
    w = _weights(root, name)
    base = load_file(StageDir(root, "pretrain").path / "base" / "model.safetensors")
    return max(float((w[k] - base[k.removeprefix("model.")]).abs().max()) for k in w if k.removeprefix("model.") in base)


def _summary(root, name):
    return json.loads((StageDir(root, name).path / harness.SUMMARY).read_text())


def _same_curves(root, a, b, keys, rtol, atol):
    for key in keys:
        x, y = _curve(root, a, key), _curve(root, b, key)
        assert len(x) == len(y) > 0, key
        assert torch.allclose(x, y, rtol=rtol, atol=atol), f"{a} vs {b}: {key} max diff {float((x - y).abs().max())}"


# ---------------------------------------------------------------- FSDP2 against DDP

@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_fsdp_step_matches_ddp(variants, stage):
    root, _ = variants
    ddp, fsdp = f"{stage}_ddp", f"{stage}_fsdp"
    _same_curves(root, ddp, fsdp, ["loss", "grad_norm"], rtol=1e-6, atol=FSDP_ATOL)
    diff = _max_weight_diff(root, ddp, fsdp)
    print(f"{stage}: FSDP vs DDP max abs weight difference {diff:.3g} (moved {_moved(root, ddp):.3g})")
    assert diff <= FSDP_ATOL
    assert _moved(root, ddp) > 100 * FSDP_ATOL
    s_ddp, s_fsdp = _summary(root, ddp), _summary(root, fsdp)
    assert s_fsdp["steps"] == s_ddp["steps"] > 1
    assert len(set(s_fsdp["weights_checksums"])) == 1 and len(s_fsdp["weights_checksums"]) == WORLD
    if stage == "sft":
        assert s_fsdp["val_loss"] == pytest.approx(s_ddp["val_loss"], abs=1e-6)  # held-out loss over shards
    else:
        for name in s_ddp["valid"]:
            assert s_fsdp["valid"][name]["accuracy"] == pytest.approx(s_ddp["valid"][name]["accuracy"], abs=1e-9)
        assert s_fsdp["reward_bias"] == pytest.approx(s_ddp["reward_bias"], abs=1e-5)


def test_more_fsdp_workers_than_examples_train_as_one_worker(variants, tiny_config):
    """sft.num_workers > sft.batch_size (a paper-size SFT sharded wider than its batch of 8):
    the idle worker's pass adds nothing, and the run is one worker's on the same batches."""
    root, _ = variants
    one = _config(tiny_config, root, "sft.batch_size=1", "sft.num_workers=1")
    harness.prepare_stage_dir(StageDir(root, "sft_spread_one"), resume=False)
    harness.run_local(one, "sft_spread_one", sft.train_loop, section="sft", base=pretrain.base_model(one))
    _same_curves(root, "sft_spread_one", "sft_spread_fsdp", ["loss", "grad_norm"], rtol=1e-6, atol=FSDP_ATOL)
    assert len(_rows(root, "sft_spread_fsdp")) > 50
    # Each step agrees to ~1e-7 (the sharded norm and reduce sum in another order than one
    # worker); Adam carries that rounding through the run's ~90 steps (measured 1.7e-5).
    diff, moved = _max_weight_diff(root, "sft_spread_one", "sft_spread_fsdp"), _moved(root, "sft_spread_one")
    print(f"sft spread over 2 workers vs 1: max abs weight difference {diff:.3g} (moved {moved:.3g})")
    assert diff <= SPREAD_WEIGHT_ATOL < moved / 20


def test_sharded_model_exports_a_plain_hf_directory(variants):
    root, _ = variants
    policy = load_policy(StageDir(root, "sft_fsdp").final)
    assert type(policy).__name__ == "GPT2LMHeadModel" and policy.lm_head.weight is policy.transformer.wte.weight
    assert policy.config.architectures == ["GPT2LMHeadModel"]
    reference = load_policy(StageDir(root, "sft_ddp").final)
    ids = torch.arange(2, 30)[None]
    with torch.no_grad():
        assert torch.allclose(policy(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-5)
    scalar = ScalarModel.from_pretrained(StageDir(root, "rm_fsdp").final)
    assert scalar.reward_bias == pytest.approx(_summary(root, "rm_fsdp")["reward_bias"])
    for name in ("sft_fsdp", "rm_fsdp"):
        ckpt = StageDir(root, name).latest_checkpoint()
        assert dist_checkpoint.is_sharded_checkpoint(ckpt)  # each rank wrote its part
        assert {p.name for p in ckpt.iterdir()} >= {"rank0.pt", "rank1.pt", "__0_0.distcp", "__1_0.distcp"}
        assert not (ckpt / "state.pt").exists()
    assert (StageDir(root, "sft_ddp").latest_checkpoint() / "state.pt").exists()  # ddp: today's format


# ---------------------------------------------------------------- gradient accumulation

@pytest.mark.parametrize("one,many", [("sft_ddp", "sft_ddp_micro"), ("sft_uneven", "sft_uneven_fsdp_micro"),
                                      ("rm_ddp", "rm_ddp_micro"), ("rm_ddp", "rm_fsdp_micro")])
def test_micro_batches_make_the_same_update(variants, one, many):
    root, _ = variants
    # Same loss, and the same gradient norm: each micro-batch is weighted by its own share
    # of the global batch (a plain mean per micro-batch would scale the gradient).
    _same_curves(root, one, many, ["loss", "grad_norm"], rtol=MICRO_RTOL, atol=MICRO_ATOL)
    diff = _max_weight_diff(root, one, many, skip=RM_NOISE_ONLY if one.startswith("rm") else ())
    print(f"{one} vs {many}: max abs weight difference {diff:.3g} (moved {_moved(root, one):.3g})")
    assert diff <= MICRO_WEIGHT_ATOL
    assert _moved(root, one) > 50 * MICRO_WEIGHT_ATOL


# ---------------------------------------------------------------- 16-bit compute

@pytest.mark.parametrize("name", ["sft_bf16_fsdp", "sft_bf16_ddp", "sft_fp16_fsdp", "rm_bf16_ddp"])
def test_16bit_runs_train_near_the_float32_curve(variants, name):
    root, _ = variants
    reference = "rm_ddp" if name.startswith("rm") else "sft_ddp"
    loss, loss32 = _curve(root, name, "loss"), _curve(root, reference, "loss")
    assert len(loss) == len(loss32) > 1 and torch.isfinite(loss).all()
    assert float(loss[-2:].mean()) < float(loss[:2].mean()) - 0.02  # it learns
    gap = float((loss - loss32).abs().max())
    print(f"{name}: loss {float(loss[0]):.4f} -> {float(loss[-1]):.4f}, max gap to float32 {gap:.3g}")
    assert 0 < gap < 0.05, f"{name}: max loss gap to float32 {gap}"  # computed in 16 bits, and close
    assert all(w.dtype == torch.float32 for w in _weights(root, name).values())  # float32 master weights
    if name.startswith("sft_fp16"):
        scales = _curve(root, name, "loss_scale")
        assert len(scales) == len(loss) and float(scales.min()) >= 1.0


# ---------------------------------------------------------------- sharded resume

def test_killed_fsdp_stage_resumes_as_the_uninterrupted_run(variants, tiny_config, tmp_path):
    root, cfgs = variants
    cfg = _config(tiny_config, root, *RUNS["sft_resume_ref"][1])
    name = "sft_resumed"
    stage = StageDir(root, name)
    base = pretrain.base_model(cfg)
    with pytest.raises(mp.ProcessExitedException):
        harness.run_processes(cfg, name, _killed_after_checkpoint, WORLD, checkpoint_every=RESUME_EVERY,
                              base=base, kill_after=KILL_AFTER)
    killed_at = time.time()
    checkpoint = stage.latest_checkpoint()
    assert checkpoint is not None and checkpoint.name == f"step_{KILL_AFTER:08d}" and not stage.is_done()
    assert dist_checkpoint.is_sharded_checkpoint(checkpoint)

    summary = harness.run_processes(cfg, name, sft.train_loop, WORLD, checkpoint_every=RESUME_EVERY,
                                    section="sft", base=base)
    rows = _rows(root, name, "demo_loss")
    assert [r["step"] for r in rows] == list(range(1, summary["steps"] + 1))  # each step once
    assert KILL_AFTER < summary["steps"]
    assert all(r["time"] < killed_at for r in rows if r["step"] <= KILL_AFTER)  # kept, not redone
    assert all(r["time"] > killed_at for r in rows if r["step"] > KILL_AFTER)
    # Dropout is on: the per-rank RNG states came back too. Same operations, same numbers.
    ref = _rows(root, "sft_resume_ref", "demo_loss")
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref]
    assert [r["grad_norm"] for r in rows] == [r["grad_norm"] for r in ref]
    assert _max_weight_diff(root, name, "sft_resume_ref") == 0.0


# ---------------------------------------------------------------- fp16 loss scaling (one process)

def test_fp16_step_unscales_and_skips_an_overflowed_step():
    from rlhf.schedules import cosine_to_fraction, lambda_lr
    from rlhf.sharding import LossScaler

    model = torch.nn.Linear(3, 1, bias=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scheduler = lambda_lr(optimizer, cosine_to_fraction, total_steps=4, final_fraction=0.1)
    scaler = LossScaler(True, init_scale=1024.0)
    start = model.weight.detach().clone()

    (model(torch.ones(1, 3)).sum() * scaler.scale).backward()  # d/dw = 1 per weight, times the scale
    norm = training.optimizer_step(model, optimizer, scheduler, None, scaler)
    assert norm == pytest.approx(3 ** 0.5)  # the unscaled gradient's norm
    assert torch.allclose(model.weight, start - 0.5)  # stepped with the unscaled gradient
    assert scaler.scale == 1024.0 and model.weight.grad is None

    after_good, lr_before = model.weight.detach().clone(), scheduler.get_last_lr()[0]
    model.weight.grad = torch.full_like(model.weight, float("inf"))  # an fp16 overflow
    norm = training.optimizer_step(model, optimizer, scheduler, None, scaler)
    assert norm == float("inf") and torch.equal(model.weight, after_good)  # skipped
    assert scaler.scale == 512.0 and scheduler.get_last_lr()[0] < lr_before  # the schedule goes on
