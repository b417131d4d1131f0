"""Shared pieces of the benchmarks: machine facts, tables, JSON results, untrained models.

Every benchmark prints a table and writes bench/results/<name>.json with the
machine it ran on (CPU, threads, load average before and after), so a number is
never quoted without its conditions.
"""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine_info() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    import ray
    import transformers
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "torch": torch.__version__,
            "transformers": transformers.__version__, "ray": ray.__version__,
            "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
            "transparent_hugepage": thp.read_text().strip() if thp.exists() else None,
            "load_average_1_5_15": load_average(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def print_table(title: str, rows: Sequence[dict], columns: Sequence[str]) -> None:
    def fmt(v) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print(f"\n{title}")
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def write_results(name: str, payload: dict, quick: bool = False) -> Path:
    """bench/results/<name>.json (quick runs go to <name>.quick.json, never over a full run)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}{'.quick' if quick else ''}.json"
    payload = {"machine": machine_info(), **payload}
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"\nwrote {path.relative_to(ROOT)}")
    return path


def start_local_ray(num_cpus: int = 2) -> None:
    """A fresh local Ray instance of `num_cpus` CPUs, never a cluster already running here.

    The actors' environment is orchestration.cluster.ACTOR_ENV (no hub, quiet
    tokenizers); variables set in this process (e.g. THP_MEM_ALLOC_ENABLE) reach them too.
    """
    import ray

    from orchestration.cluster import ACTOR_ENV, WORKER_ONLY_ENV

    os.environ.update(ACTOR_ENV)
    ray.init(address="local", num_cpus=num_cpus, runtime_env={"env_vars": ACTOR_ENV | WORKER_ONLY_ENV},
             include_dashboard=False,
             logging_level="WARNING")


def best_of(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """(fastest wall seconds, last result) over `repeats` calls: the least disturbed by other load."""
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def best_of_alternating(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, tuple[float, object]]:
    """`best_of` for several contenders, taking turns call by call: a slow spell of a shared
    machine then lands on all of them, not on whichever happened to run in it."""
    best = {name: (float("inf"), None) for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            out = fn()
            best[name] = (min(best[name][0], time.perf_counter() - start), out)
    return best


# ---------------------------------------------------------------- models and data


@dataclass
class BenchModels:
    policy: Path       # HF directory of the (untrained) policy, tokenizer included
    reward: Path       # HF directory of the (untrained) scalar-head RM
    tokenizer: object
    params: int        # policy parameters


def disable_eos(model) -> None:
    """Make EOS an id the model cannot emit (= vocab size), so every response has full length.

    Both sides of every comparison read EOS from the saved config, so both generate
    exactly max_new_tokens per row: equal work, whatever the untrained model samples.
    """
    unreachable = model.config.vocab_size
    model.config.eos_token_id = unreachable
    model.generation_config.eos_token_id = unreachable


def build_models(folder: Path, vocab_size: int, n_layer: int, n_head: int, n_embd: int,
                 n_positions: int, seed: int = 0, with_eos: bool = False) -> BenchModels:
    """A tokenizer trained on the synthetic corpus and untrained GPT-2 policy + RM, saved as HF dirs."""
    from rlhf.models import ScalarModel
    from rlhf.synthetic import tokenizer_training_text
    from rlhf.tiny import build_tiny_model, train_tokenizer

    tok = train_tokenizer(tokenizer_training_text(seed, n_docs=2000), vocab_size=vocab_size,
                          model_max_length=n_positions)
    policy = build_tiny_model(tok, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                              n_positions=n_positions, seed=seed)
    if not with_eos:
        disable_eos(policy)
    paths = BenchModels(folder / "policy", folder / "rm", tok, sum(p.numel() for p in policy.parameters()))
    policy.save_pretrained(paths.policy)
    tok.save_pretrained(paths.policy)
    ScalarModel.from_causal_lm(policy, seed=seed + 1).save_pretrained(paths.reward)
    tok.save_pretrained(paths.reward)
    return paths


def synthetic_prompts(tokenizer, n: int, max_tokens: int, seed: int = 0) -> list[str]:
    """`n` training prompts of the synthetic suite (at most `max_tokens` tokens each)."""
    from rlhf.synthetic import SyntheticSuite

    out = []
    for _, p in SyntheticSuite(seed).prompts("train", 2 * n):
        if len(tokenizer(p, add_special_tokens=False)["input_ids"]) <= max_tokens:
            out.append(p)
        if len(out) == n:
            return out
    raise ValueError(f"fewer than {n} synthetic prompts of <= {max_tokens} tokens")


def ptx_blocks(tokenizer, seq_len: int, n_docs: int = 2000, seed: int = 0) -> torch.Tensor:
    """Packed pretraining blocks [N, seq_len] from the synthetic corpus."""
    from rlhf.collate import pack_text
    from rlhf.synthetic import pretraining_corpus

    return pack_text(tokenizer, pretraining_corpus(seed, n_docs), seq_len)
