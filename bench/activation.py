"""GPT-2's tanh GELU: the composed "gelu_new" against the fused "gelu_pytorch_tanh", one training step.

    .venv/bin/python bench/activation.py [--quick]

The same function (largest difference printed), so the tiny models use the fused one
(rlhf/tiny.py). For the tiny policy (2 blocks) and the RM (4 blocks) at 128 wide: forward,
backward and an Adam step on a batch of 40 rows x 80 tokens (about an RM batch), both
threads; the best of 5 rounds of 20 steps each. Writes bench/results/activation.json.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import print_table, write_results  # noqa: E402

ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")


def step_seconds(activation: str, n_layer: int, rows: int, tokens: int, rounds: int, steps: int) -> float:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=1024, n_layer=n_layer, n_head=4, n_embd=128,
                                       n_positions=128, activation_function=activation,
                                       bos_token_id=0, eos_token_id=0))
    opt = torch.optim.Adam(model.parameters(), 1e-4)
    x = torch.randint(0, 1024, (rows, tokens))

    def step() -> None:
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()

    for _ in range(3):
        step()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        best = min(best, (time.perf_counter() - start) / steps)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    from transformers.activations import ACT2FN

    x = torch.linspace(-8, 8, 100_001)
    diff = (ACT2FN["gelu_new"](x) - ACT2FN["gelu_pytorch_tanh"](x)).abs().max().item()
    rounds, steps = (1, 3) if args.quick else (5, 20)
    rows = []
    for name, n_layer in (("tiny policy", 2), ("tiny RM", 4)):
        s = {a: step_seconds(a, n_layer, 40, 80, rounds, steps) for a in ACTIVATIONS}
        rows.append({"model": name, "blocks": n_layer, "gelu_new_ms": 1e3 * s["gelu_new"],
                     "gelu_pytorch_tanh_ms": 1e3 * s["gelu_pytorch_tanh"],
                     "speedup": s["gelu_new"] / s["gelu_pytorch_tanh"]})
    print(f"largest |gelu_new - gelu_pytorch_tanh| on [-8, 8]: {diff:.2e}")
    print_table("Training step (40 x 80 tokens), ms", rows,
                ["model", "blocks", "gelu_new_ms", "gelu_pytorch_tanh_ms", "speedup"])
    write_results("activation", {"rows": rows, "max_abs_difference": diff}, quick=args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
