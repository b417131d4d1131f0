"""Measurement beside the PPO loop: phase times, throughput, gold scores, restarts.

Nothing here changes training. The held-out probe samples a fixed set of test
prompts with a fixed seed using the policy that sampled the iteration (v_k), so
iterations compare like with like (the training batch's gold score swings with its
prompt mix); the gold labeler exists only for the synthetic task.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

from orchestration.ppo.team import ActorTeam
from orchestration.ppo.timing import PhaseTimer
from rlhf.experience import Rollout
from rlhf.seeds import derive_seed


class Observer:
    def __init__(self, team: ActorTeam, tokenizer, seed: int, batch_size: int,
                 gold_scorer: Callable[[str, str], float] | None = None, probe_prompts: tuple[str, ...] = ()):
        self.team, self.tok, self.batch_size = team, tokenizer, batch_size
        self.gold_scorer, self.probe_prompts = gold_scorer, list(probe_prompts)
        self.probe_seed = derive_seed(seed, "probe")
        self.timer = PhaseTimer()
        self._extra: dict = {}
        self._probe = None  # the held-out probe in flight

    @property
    def where(self) -> tuple[int, str]:
        """(iteration, phase) now running: generate, probe, score, learn, sync, checkpoint."""
        return self.team.faults.where

    def at(self, k: int, name: str) -> None:
        self.team.faults.where = (k, name)  # restart records say where they happened

    @contextmanager
    def phase(self, k: int, name: str):
        """A timed phase of iteration k."""
        self.at(k, name)
        with self.timer.phase(name):
            yield
        if name == "generate":  # before the probe samples again
            sizes = [rows * positions for rows, positions in self.team.generators.passes]
            self._extra |= {"generation_passes": len(sizes), "generation_peak_tokens": max(sizes, default=0)}

    def probe(self, k: int, install=None) -> None:
        """Gold score of v_k on the held-out prompts (measurement only). With `install`
        (asynchronous rollouts: v_k as published), queued behind the generators' work with
        those weights installed first, and collected by `record`."""
        if self.probe_prompts and self.gold_scorer is not None:
            self.at(k, "probe")
            self._probe = self.team.generators.submit(self.probe_prompts, seed=self.probe_seed, install=install)
            if install is None:
                self._collect_probe(k)

    def _collect_probe(self, k: int) -> None:
        if self._probe is not None:
            with self.phase(k, "probe"):
                rollout, _ = self._probe.result()
                self._extra["heldout_gold_score"] = self.gold(rollout)
            self._probe = None

    def gold(self, rollout: Rollout) -> float:
        scores = [self.gold_scorer(prompt, self.tok.decode(ids[act.bool()].tolist()))
                  for ids, act, prompt in zip(rollout.input_ids, rollout.action_mask, rollout.prompts)]
        return sum(scores) / len(scores)

    def record(self, k: int, rollout: Rollout, stats: dict) -> dict:
        """The iteration's metrics row: training stats plus what was measured beside them."""
        self._collect_probe(k)
        if self.gold_scorer is not None:
            stats["gold_score"] = self.gold(rollout)
        stats |= self._extra | self.team.last_sync | self.team.faults.metrics()
        self._extra = {}
        seconds = self.timer.pop()
        training_seconds = sum(v for name, v in seconds.items() if name != "seconds_probe")
        return stats | seconds | {
            "iteration": k, "episodes": (k + 1) * self.batch_size, "weight_version": rollout.weight_version,
            "tokens_per_second": int(rollout.attention_mask.sum()) / max(training_seconds, 1e-9),
            "generated_tokens_per_second": int(rollout.action_mask.sum()) / max(seconds["seconds_generate"], 1e-9),
        }
