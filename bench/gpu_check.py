"""GPU check: learner steps of a ~1.3B GPT-2 under FSDP2 in bf16, against the memory plan.

    python bench/gpu_check.py                       # on a GPU box: torch + transformers only
    python bench/gpu_check.py --cpu --tiny          # the same code at toy size on the CPU (a test runs it)

Builds a GPT-2 from its config (no download: 24 layers, d 2048, 16 heads, vocab
50257, 2048 positions, 1.32B parameters), starts a one-process torch.distributed
group itself (NCCL, or gloo on the CPU), prepares the model as the learners do
(`rlhf.sharding.prepare`: `fully_shard` per block plus the root,
MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32), optional activation
checkpointing) and runs learner steps on random tokens: forward through
`rlhf.forward.policy_logits`, the causal-LM loss the ptx pass uses
(`rlhf.losses.ptx_lm_loss`), backward, AdamW. Reports tokens/s, MFU against the
card's dense bf16 peak (a small table by device name, or --peak-tflops), and peak
memory (torch.cuda.max_memory_allocated over the measured steps; on the CPU
`rlhf.memory_measure`) against `rlhf.memory_math`'s prediction for this step.
Writes bench/results/gpu_check.json (--out to change).

Only torch, transformers and torch-only modules of rlhf are imported: no Ray,
vLLM or pydantic, and yaml only as transformers' own dependency (--check-imports
prints the top-level modules loaded; tests/integration/test_gpu_check.py runs it
with those imports blocked).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from rlhf import memory_math as mm  # noqa: E402  (stdlib only)

# Dense bf16 peak TFLOP/s by device-name fragment, first match wins (vendor datasheets).
PEAK_BF16_TFLOPS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
                    ("GH200", 989.0), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10", 125.0)]
PAPER = dict(layers=24, hidden=2048, heads=16, vocab=50257, positions=2048, batch=4, seq=2048)
TINY = dict(layers=2, hidden=64, heads=4, vocab=512, positions=64, batch=2, seq=64)


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf for key, tf in PEAK_BF16_TFLOPS if key in name), None)


def init_group(device: torch.device) -> None:
    """A one-process group on a free local port (FSDP2 needs a process group even alone)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1, timeout=datetime.timedelta(seconds=120))


def build(shape: dict, device: torch.device, checkpointing: bool, dtype: str):
    from transformers import GPT2Config, GPT2LMHeadModel

    from rlhf.sharding import TrainLayout, prepare
    config = GPT2Config(n_layer=shape["layers"], n_embd=shape["hidden"], n_head=shape["heads"],
                        vocab_size=shape["vocab"], n_positions=shape["positions"], bos_token_id=0, eos_token_id=0)
    with torch.device("cpu"):
        model = GPT2LMHeadModel(config).eval()  # eval: no dropout, as the PPO learners train
    layout = TrainLayout("fsdp", dtype, checkpointing)
    return prepare(model, layout, device, world_size=1)


def planned_bytes(shape: dict, compute_bytes: int, checkpointing: bool, cuda: bool) -> float:
    """rlhf.memory_math's peak for this step: one FSDP rank, .grad only (no learner buckets)."""
    s = mm.ModelShape("gpt2", shape["layers"], shape["hidden"], shape["heads"], shape["vocab"],
                      4 * shape["hidden"], shape["positions"])
    st = mm.train_state(s, "lm", compute_bytes, 1, sharded=True, grad_copies=1, resident_grad_copies=0,
                        ema=False, cuda=cuda)
    act = mm.train_activation_bytes(s, shape["batch"], shape["seq"], compute_bytes, "lm", checkpointing,
                                    kv_kept=mm.CAUSAL_LM_FORWARD_KEEPS_KV, padded=False)
    train = st.master + st.compute_copy + st.grads + st.grads_gathered + st.optimizer + act
    step = st.master + st.grads + st.optimizer + st.step_transient
    return max(train, step)


def run_variant(shape: dict, device: torch.device, checkpointing: bool, dtype: str, steps: int,
                warmup: int, peak: float | None) -> dict:
    from rlhf.forward import policy_logits
    from rlhf.losses import ptx_lm_loss
    from rlhf.memory_measure import measure_peak

    torch.manual_seed(0)
    model = build(shape, device, checkpointing, dtype)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95))
    ids = torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"]), device=device)
    ones = torch.ones_like(ids)

    def step() -> float:
        loss = ptx_lm_loss(policy_logits(model, ids, ones), ids, ones.float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    for _ in range(warmup):  # Adam's state exists after the first
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        losses = [step() for _ in range(steps)]
        sync()
        seconds = time.perf_counter() - start
        measured = torch.cuda.max_memory_allocated(device)
        reserved = torch.cuda.max_memory_reserved(device)
    else:
        start = time.perf_counter()
        losses, pm = measure_peak(lambda: [step() for _ in range(steps)])
        seconds = time.perf_counter() - start
        measured, reserved = pm.peak, None
    tokens = shape["batch"] * shape["seq"] * steps
    # Model FLOPs per token: 6N for the weights plus attention's 12 * layers * seq * hidden
    # (recomputation under checkpointing not counted, as MFU is defined).
    flops = tokens * (6 * params + 12 * shape["layers"] * shape["seq"] * shape["hidden"])
    planned = planned_bytes(shape, mm.dtype_bytes(dtype), checkpointing, device.type == "cuda")
    out = dict(checkpointing=checkpointing, dtype=dtype, params=params, steps=steps, seconds=round(seconds, 4),
               tokens_per_s=round(tokens / seconds, 1), tflops=round(flops / seconds / 1e12, 3),
               mfu=round(flops / seconds / 1e12 / peak, 4) if peak else None,
               peak_bytes=int(measured), reserved_bytes=reserved, planned_bytes=int(planned),
               measured_over_planned=round(measured / planned, 3), losses=[round(x, 4) for x in losses])
    del model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def try_variant(shape: dict, device: torch.device, checkpointing: bool, dtype: str, steps: int,
                warmup: int, peak: float | None) -> dict:
    """`run_variant`, or a row saying it ran out of memory (with what the plan predicted)."""
    try:
        return run_variant(shape, device, checkpointing, dtype, steps, warmup, peak)
    except torch.cuda.OutOfMemoryError as e:
        torch.cuda.empty_cache()
        planned = planned_bytes(shape, mm.dtype_bytes(dtype), checkpointing, True)
        return dict(checkpointing=checkpointing, dtype=dtype, oom=str(e).splitlines()[0], planned_bytes=int(planned))


def print_table(rows: list[dict]) -> None:
    unit, div = ("GB", 1e9) if rows[0]["planned_bytes"] >= 1e9 else ("MB", 1e6)
    cols = ["checkpointing", "tokens/s", "TFLOP/s", "MFU", f"peak {unit}", f"planned {unit}", "measured/planned"]
    cells = [[str(r["checkpointing"]), "out of memory", "", "", "", f"{r['planned_bytes'] / div:.2f}", ""]
             if "oom" in r else
             [str(r["checkpointing"]), f"{r['tokens_per_s']:,.0f}", f"{r['tflops']:.1f}",
              "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}", f"{r['peak_bytes'] / div:.2f}",
              f"{r['planned_bytes'] / div:.2f}", f"{r['measured_over_planned']:.3f}"] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def machine(device: torch.device) -> dict:
    import transformers
    info = dict(python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__,
                cpu_count=os.cpu_count(), device=str(device), time=time.strftime("%Y-%m-%d %H:%M:%S"))
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_bytes=props.total_memory, cuda=torch.version.cuda,
                    gpus_visible=torch.cuda.device_count())
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="run on the CPU (gloo), e.g. to test this script")
    ap.add_argument("--tiny", action="store_true", help="a toy model (2 layers, d 64) instead of 1.3B")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, help="sequences per step (default 4; tiny 2)")
    ap.add_argument("--seq", type=int, help="tokens per sequence (default 2048; tiny 64)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--checkpointing", choices=["both", "on", "off"], default="both")
    ap.add_argument("--peak-tflops", type=float, help="the card's dense peak, if not in the table")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu_check.json")
    ap.add_argument("--check-imports", action="store_true", help="print the top-level modules loaded, at the end")
    ns = ap.parse_args(argv)
    if not ns.cpu and not torch.cuda.is_available():
        print("no CUDA device: run with --cpu (and --tiny) to check the script itself", file=sys.stderr)
        return 2
    device = torch.device("cpu") if ns.cpu else torch.device("cuda", 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    shape = dict(TINY if ns.tiny else PAPER)
    shape.update({k: v for k, v in (("batch", ns.batch), ("seq", ns.seq)) if v})
    peak = peak_tflops(device, ns.peak_tflops)
    init_group(device)
    try:
        variants = {"both": [False, True], "on": [True], "off": [False]}[ns.checkpointing]
        rows = [try_variant(shape, device, ck, ns.dtype, ns.steps, ns.warmup, peak) for ck in variants]
    finally:
        dist.destroy_process_group()
    info = machine(device)
    params = next((r["params"] for r in rows if "params" in r), 0)
    print(f"\nFSDP2 learner step, world size 1, {ns.dtype} compute, GPT-2 {params / 1e9:.3f}B "
          f"({shape['layers']} layers, d {shape['hidden']}), {shape['batch']} x {shape['seq']} tokens; "
          f"{info.get('gpu', 'CPU')}; peak {peak or 'unknown'} TFLOP/s")
    print_table(rows)
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text(json.dumps({"machine": info, "shape": shape, "peak_tflops": peak, "results": rows},
                                 indent=2) + "\n")
    print(f"wrote {ns.out}")
    if ns.check_imports:
        print("imported:", " ".join(sorted({m.split(".")[0] for m in sys.modules if not m.startswith("_")})))
    return 0


if __name__ == "__main__":
    sys.exit(main())
