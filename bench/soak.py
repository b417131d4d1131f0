"""Soak: a long PPO-ptx run, memory per iteration, and whether anything grows.

    .venv/bin/python bench/soak.py [--iterations 200] [--batch-size 32] [--quick]

The tiny preset's PPO stage (`PPOTrainer.run`, checkpoints, EMA, weight sync, the
preset's ptx) with 2 generators on a local `ray.init(num_cpus=2)`, from an untrained
policy and RM of the preset's shape (bench.common.build_models). After every iteration
a sampler thread records the resident memory (VmRSS) of the driver and of each of our
actor processes, the run folder's size on disk, and the latest reading of the Ray object
store's bytes in use (a slower query, polled beside).
After the warm-up (the first `--warmup` iterations) it fits a line per series, iteration
against MiB, and reports the slope with its 95% interval (OLS; consecutive iterations are
correlated, so the interval is optimistic). A series is flat when its growth over the
measured iterations, slope x iterations, is under 2% of its mean or the interval holds 0.
Writes bench/results/soak.json and bench/results/soak.png.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import RESULTS, build_models, print_table, ptx_blocks, start_local_ray, synthetic_prompts  # noqa: E402
from bench.common import write_results  # noqa: E402

FLAT_SHARE = 0.02  # growth over the measured iterations below 2% of the mean counts as flat
T95 = 1.96         # normal quantile; the fits have 40+ points


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


OURS = {"RolloutGenerator", "RewardScorer", "ReferenceScorer", "PolicyLearner", "CriticLearner"}


def actor_processes() -> dict[int, str]:
    """pid -> actor class for this machine's Ray workers that host one of our actors
    (their process title is `ray::ClassName` or `ray::ClassName.method`)."""
    out = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            title = (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        m = re.match(r"ray::([A-Za-z_]\w*)", title)
        if m and m.group(1) in OURS:
            out[int(proc.name)] = m.group(1)
    return out


def object_store_mib() -> float:
    """Bytes held in the local object store, from the raylet's own summary."""
    from ray._private.internal_api import memory_summary

    m = re.search(r"Plasma memory usage (\d+) MiB", memory_summary(stats_only=True))
    return float(m.group(1)) if m else float("nan")


def folder_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


class Sampler(threading.Thread):
    """Polls the trainer's iteration counter; one row per finished iteration.

    The object store's figure comes from a raylet query that waits on busy workers
    (seconds here), so a second thread keeps the latest one and each row takes it.
    """

    def __init__(self, trainer, run_dir: Path):
        super().__init__(daemon=True)
        self.trainer, self.run_dir, self.rows, self.stop = trainer, run_dir, [], threading.Event()
        self.names: dict[int, str] = {}
        self.store = (float("nan"), 0)  # (MiB, iteration it was read at)
        self.store_thread = threading.Thread(target=self._poll_store, daemon=True)

    def _poll_store(self) -> None:
        while not self.stop.is_set():
            k = self.trainer.iteration
            self.store = (object_store_mib(), k)
            self.stop.wait(0.5)

    def run(self) -> None:
        self.store_thread.start()
        seen = self.trainer.iteration
        while not self.stop.is_set():
            k = self.trainer.iteration
            if k != seen:
                seen = k
                actors = actor_processes()
                for pid, cls in actors.items():  # a stable label per process: class + its order of appearance
                    self.names.setdefault(pid, f"{cls}#{sum(1 for n in self.names.values() if n.startswith(cls + '#'))}")
                store, store_at = self.store
                row = {"iteration": k, "time": time.time(), "driver_mib": rss_mib(os.getpid()),
                       "object_store_mib": store, "object_store_read_at": store_at,
                       "run_dir_mib": folder_mib(self.run_dir)}
                for pid in actors:
                    row[self.names[pid]] = rss_mib(pid)
                row["actors_total_mib"] = sum(v for n, v in row.items() if "#" in n and v is not None)
                self.rows.append(row)
            time.sleep(0.02)
        self.store_thread.join()


def fit(xs: list[float], ys: list[float]) -> dict:
    """Least-squares slope of ys on xs with a 95% interval."""
    n = len(xs)
    mx, my = statistics.mean(xs), statistics.mean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    resid = [y - my - slope * (x - mx) for x, y in zip(xs, ys)]
    se = math.sqrt(sum(r * r for r in resid) / (n - 2) / sxx) if n > 2 else float("nan")
    lo, hi = slope - T95 * se, slope + T95 * se
    growth = slope * (xs[-1] - xs[0])
    flat = abs(growth) < FLAT_SHARE * abs(my) or lo <= 0 <= hi
    return {"mean_mib": my, "slope_mib_per_it": slope, "ci95": [lo, hi], "growth_mib": growth, "flat": flat}


def plot(rows: list[dict], series: list[str], warmup: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    its = [r["iteration"] for r in rows]
    for name in series:
        ax = axes[1] if name in ("object_store_mib", "run_dir_mib") else axes[0]
        ax.plot(its, [r.get(name) for r in rows], label=name)
    for ax, title in zip(axes, ["resident memory (MiB)", "object store and run folder (MiB)"]):
        ax.axvline(warmup, color="grey", linestyle=":", label="end of warm-up")
        ax.set_xlabel("PPO iteration")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path.relative_to(RESULTS.parent.parent)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="12 iterations of batch 16: the machinery only")
    args = parser.parse_args(argv)
    if args.quick:
        args.iterations, args.warmup, args.batch_size = 12, 4, 16
    logging.basicConfig(level=logging.WARNING)

    import ray

    from orchestration.ppo.trainer import PPOInputs, PPOTrainer
    from orchestration.rundir import StageDir
    from rlhf.config import load_config

    with tempfile.TemporaryDirectory() as tmp:
        b = args.batch_size
        cfg = load_config("tiny", [f"run.output_dir={tmp}", "resources.num_cpus=2", "ppo.num_generators=2",
                                   f"ppo.batch_size={b}", f"ppo.minibatch_size={max(b // 8, 1)}",
                                   f"ppo.episodes={b * args.iterations}"])
        t = cfg.model.tiny
        models = build_models(Path(tmp) / "models", t.vocab_size, t.n_layer, t.n_head, t.n_embd,
                              t.n_positions or cfg.model.context_length, seed=cfg.run.seed, with_eos=True)
        prompts = synthetic_prompts(models.tokenizer, 8 * b, cfg.model.max_prompt_tokens)
        inputs = PPOInputs(policy=models.policy, reward_model=models.reward, tokenizer=models.tokenizer,
                           prompts=prompts, ptx_blocks=ptx_blocks(models.tokenizer, cfg.ppo.ptx_seq_len))
        start_local_ray(2)
        stage = StageDir(Path(tmp), "ppo")
        trainer = PPOTrainer(cfg, stage, inputs, ptx_coef=cfg.ppo.ptx_coef)
        sampler = Sampler(trainer, stage.path)
        sampler.start()
        start = time.time()
        try:
            trainer.run()
        finally:
            sampler.stop.set()
            sampler.join()
            trainer.shutdown()
            ray.shutdown()
        wall = time.time() - start
        rows = sampler.rows

    series = ["driver_mib", "actors_total_mib", *sorted({n for r in rows for n in r if "#" in n}),
              "object_store_mib", "run_dir_mib"]
    measured = [r for r in rows if r["iteration"] > args.warmup]
    fits = []
    for name in series:
        pts = [(r["iteration"], r[name]) for r in measured if r.get(name) is not None and not math.isnan(r[name])]
        if len(pts) >= 3:
            fits.append({"series": name, **fit([p[0] for p in pts], [p[1] for p in pts])})
    print(f"{len(rows)} iterations of batch {args.batch_size} in {wall:.0f} s; fits over iterations "
          f"{args.warmup + 1}..{rows[-1]['iteration'] if rows else 0}")
    print_table("Soak: MiB per series after warm-up (slope in MiB per iteration, 95% interval)",
                [f | {"ci95": f"[{f['ci95'][0]:.3f}, {f['ci95'][1]:.3f}]"} for f in fits],
                ["series", "mean_mib", "slope_mib_per_it", "ci95", "growth_mib", "flat"])
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(rows, series, args.warmup, RESULTS / f"soak{'.quick' if args.quick else ''}.png")
    write_results("soak", {"iterations": args.iterations, "warmup": args.warmup, "batch_size": args.batch_size,
                           "wall_s": wall, "fits": fits, "rows": rows,
                           "rule": f"flat: |slope x iterations| < {FLAT_SHARE:.0%} of the mean, or the 95% "
                                   "interval holds 0"}, quick=args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
