"""Two PPO configurations of our system, measured in turn in one Ray instance: an A/B that noise cannot fake.

    .venv/bin/python bench/ppo_ab.py PRESET "A overrides" "B overrides" [--rounds N] [--quick]

Overrides are comma-separated `key=value` (an empty string: the preset as it is),
e.g. `bench/ppo_ab.py small "ppo.ptx_coef=0" "ppo.ptx_coef=0,ppo.num_learners=1"`.
Both trainers are built on the same untrained models, prompts and ptx blocks as
bench/ppo_iteration.py, each warmed up with one iteration; then every round steps A
once and B once. On this shared machine a system measured alone moves 10-20% from one
run to the next, so only a ratio whose rounds agree in sign means something: the table
shows each round. Both teams must fit the machine's CPUs at once (their fractional
reservations, `rlhf.placement.cpu_share`): two teams do on 2 CPUs, three do not.
Writes bench/results/ppo_ab.json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import load_average, print_table, start_local_ray, write_results  # noqa: E402
from bench.ppo_iteration import QUICK, TIMED, bench_inputs, warm_trainer  # noqa: E402


def overrides(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    import ray

    from orchestration.rundir import StageDir
    from rlhf.config import load_config

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("preset")
    ap.add_argument("a", help='A\'s overrides, comma-separated ("" for the preset)')
    ap.add_argument("b", help="B's overrides")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="smoke run: small batches, 1 round")
    args = ap.parse_args(argv)
    rounds = 1 if args.quick else args.rounds
    tmp = Path(tempfile.mkdtemp(prefix="ppo_ab_"))
    base = [f"run.output_dir={tmp}", "resources.num_cpus=2", *(QUICK.get(args.preset, []) if args.quick else [])]
    texts = {"A": args.a, "B": args.b}
    cfgs = {name: load_config(args.preset, base + overrides(text)) for name, text in texts.items()}
    load = load_average()
    models, prompts, blocks = bench_inputs(cfgs["A"], tmp / "models")
    start_local_ray(2)
    trainers = {}
    try:
        for name, cfg in cfgs.items():
            trainers[name] = warm_trainer(cfg, models, prompts, blocks, StageDir(tmp, f"ppo-{name}"))
        rows = []
        for k in range(1, rounds + 1):
            for name, trainer in trainers.items():
                start = time.perf_counter()
                m = trainer.step(k)
                rows.append({"round": k, "system": name, "s": time.perf_counter() - start} |
                            {f"{p}_s": m.get(f"seconds_{p}", 0.0) for p in TIMED})
                print(f"  round {k} {name}: {rows[-1]['s']:.2f} s", flush=True)
    finally:
        for trainer in trainers.values():
            trainer.shutdown()
        ray.shutdown()
    columns = ["s", *(f"{p}_s" for p in TIMED)]
    means = [{"system": name, "overrides": text or "(preset)"} |
             {key: statistics.mean(r[key] for r in rows if r["system"] == name) for key in columns}
             for name, text in texts.items()]
    wins = sum(a["s"] > b["s"] for a, b in zip(rows[::2], rows[1::2]))
    means[1]["speedup"] = means[0]["s"] / means[1]["s"]
    means[1]["rounds_B_faster"] = f"{wins}/{rounds}"
    print_table(f"{args.preset}: seconds per round", rows, ["round", "system", *columns])
    print_table(f"{args.preset}: means (speedup = A's seconds over B's)", means,
                ["system", "overrides", *columns, "speedup", "rounds_B_faster"])
    write_results("ppo_ab", {"preset": args.preset, "rounds": rows, "means": means, "load_before": load,
                             "load_after": load_average()}, quick=args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
