"""The runs behind the findings: what each one changes, which stages it borrows, and running it.

A run is an ordinary run directory under `<out>/runs/<name>`, made by the pipeline
(`orchestration.pipeline`) from the config plus the run's overrides. Runs that only
change PPO link the stages 0-2 of their seed's full run instead of training them
again (the claim compares PPO settings on one SFT model and RM). A run is finished
when its record (`reproduce.json`: config, seed, commit, wall time) exists; it is
written last and atomically, so an interrupted run is resumed from its checkpoints
on the next invocation and a finished one is never repeated.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from orchestration import pipeline
from rlhf.config import Config, load_config

log = logging.getLogger(__name__)

RECORD = "reproduce.json"
SHARED_STAGES = ("data", "pretrain", "sft", "rm")  # what a PPO-only run borrows from its seed's run
FULL, PPO_ONLY, SFT_ONLY = ("pretrain", "sft", "rm", "sft_select", "ppo", "eval"), ("ppo", "eval"), ("pretrain", "sft")

# --quick: every experiment's machinery at toy size (a 1-block, 32-wide model, a few
# dozen steps per stage, 2 PPO iterations); the numbers it gives mean nothing.
QUICK = [
    "model.tiny.vocab_size=400", "model.tiny.n_layer=1", "model.tiny.n_head=2", "model.tiny.n_embd=32",
    "model.tiny.n_positions=96", "model.context_length=96", "model.max_response_tokens=16",
    "data.synthetic.num_demonstrations=128", "data.synthetic.num_comparisons=64",
    "data.synthetic.policy_comparisons=16", "data.synthetic.num_prompts=64",
    "data.synthetic.num_pretrain_docs=300", "data.synthetic.num_eval_prompts=32",
    "data.synthetic.num_eval_comparisons=32", "eval.num_prompts=32", "eval.num_pretrain_docs=60",
    "eval.samples_per_prompt=2", "pretrain.steps=8", "pretrain.batch_size=16", "sft.epochs=1",
    "sft.batch_size=16", "rm.epochs=1", "ppo.episodes=64", "ppo.batch_size=32", "ppo.minibatch_size=16",
    "ppo.probe_prompts=16", "ppo.checkpoint_every=1",
]


@dataclass(frozen=True)
class RunSpec:
    """One run: `overrides` on top of the base config; a borrowing run links its seed's stages 0-2."""
    name: str
    seed: int
    overrides: tuple[str, ...] = ()
    steps: tuple[str, ...] = FULL
    borrows: bool = False

    @property
    def borrow_from(self) -> str | None:
        return seed_run(self.seed).name if self.borrows else None

    def all_overrides(self, base: tuple[str, ...]) -> list[str]:
        return [*base, f"run.seed={self.seed}", f"data.synthetic.seed={self.seed}", *self.overrides]


def seed_run(seed: int) -> RunSpec:
    """The default pipeline (PPO-ptx and plain PPO) on one seed: other data, other models."""
    return RunSpec(f"seed{seed}", seed)


def ppo_variant(name: str, *overrides: str, seed: int = 0) -> RunSpec:
    """One PPO run (no ptx comparison) on seed `seed`'s stages 0-2."""
    return RunSpec(name, seed, ("ppo.compare_ptx=false", *overrides), PPO_ONLY, borrows=True)


@dataclass
class Runs:
    """Where the runs live and how their configs are made."""
    out: Path
    config: str | None
    base_overrides: tuple[str, ...] = ()

    def dir(self, name: str) -> Path:
        return self.out / "runs" / name

    def config_of(self, spec: RunSpec) -> Config:
        return load_config(self.config, [*spec.all_overrides(self.base_overrides),
                                         f"run.output_dir={self.dir(spec.name)}"])

    def record(self, name: str) -> dict | None:
        path = self.dir(name) / RECORD
        return json.loads(path.read_text()) if path.exists() else None

    def ensure(self, spec: RunSpec) -> dict:
        """Run `spec` unless its record exists (and its borrowed stages first); return its record."""
        if (done := self.record(spec.name)) is not None:
            return done
        if spec.borrow_from is not None:
            self.ensure(seed_run(spec.seed))
        cfg = self.config_of(spec)
        root = cfg.output_dir
        root.mkdir(parents=True, exist_ok=True)
        if spec.borrow_from is not None:
            for stage in SHARED_STAGES:
                link = root / stage
                if not link.exists():
                    link.symlink_to(Path("..") / spec.borrow_from / stage, target_is_directory=True)
        log.info("reproduce: run %s (seed %d%s)", spec.name, spec.seed,
                 ", " + " ".join(spec.overrides) if spec.overrides else "")
        start = time.perf_counter()
        pipeline.main(cfg, resume=True, steps=[s for s in pipeline.STEPS if s.name in spec.steps])
        record = {"name": spec.name, "seed": spec.seed, "run_overrides": list(spec.overrides),
                  "overrides": list(spec.all_overrides(self.base_overrides)),
                  "steps": list(spec.steps), "borrowed_stages_from": spec.borrow_from,
                  "config_file": cfg.source, "config": cfg.dump_without_secrets(), "commit": git_commit(),
                  "wall_s": round(time.perf_counter() - start, 1),
                  "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        write_json_atomic(root / RECORD, record)
        return record


def write_json_atomic(path: Path, payload) -> None:
    """Whole or not at all: a kill mid-write leaves the previous file (or none)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)


@functools.cache
def git_commit() -> str:
    """The commit of the code that runs ("+dirty" with uncommitted changes; "unknown" outside git).

    Read once, when the study starts: the code a long study runs is what it loaded then,
    whatever is committed while it runs."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")
