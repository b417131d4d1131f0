"""The study: the runs the findings need, loaded evaluations, and figures with intervals.

A figure is a mean with a 95% interval over seeds and prompts (or text blocks):
`figure({seed: per-prompt values})` resamples seeds, then prompts within each seed
(`rlhf.evaluation.nested_bootstrap_ci`). With one seed the interval is over prompts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from orchestration.reproduce.measures import RunEval
from orchestration.reproduce.runs import Runs, RunSpec, ppo_variant, seed_run
from rlhf.config import Config
from rlhf.evaluation import nested_bootstrap_ci

CONFIDENCE = 0.95


def figure(per_seed: dict[int, list[float]], seed: int = 0) -> dict:
    """{"value", "ci95", "seeds", "items"}: the mean of per-seed means and its nested interval."""
    groups = [v for _, v in sorted(per_seed.items())]
    lo, hi = nested_bootstrap_ci(groups, CONFIDENCE, seed=seed)
    return {"value": sum(sum(g) / len(g) for g in groups) / len(groups), "ci95": [lo, hi],
            "seeds": sorted(per_seed), "items": [len(g) for g in groups]}


@dataclass
class Study:
    runs: Runs
    seeds: tuple[int, ...]
    quick: bool
    _evals: dict[str, RunEval] = field(default_factory=dict)

    @cached_property
    def base(self) -> Config:
        """The config every run starts from (seed 0's): its PPO settings anchor the sweeps."""
        return self.runs.config_of(seed_run(0))

    def seed_runs(self) -> list[RunSpec]:
        return [seed_run(s) for s in self.seeds]

    def variant(self, name: str, *overrides: str) -> RunSpec:
        return ppo_variant(name, *overrides, seed=self.seeds[0])

    def eval(self, name: str) -> RunEval:
        if name not in self._evals:
            self._evals[name] = RunEval.load(self.runs.dir(name))
        return self._evals[name]

    def per_seed(self, fn) -> dict[int, list[float]]:
        """{seed: fn(that seed's full-run evaluation)} over the study's seeds."""
        return {s: fn(self.eval(seed_run(s).name)) for s in self.seeds}
