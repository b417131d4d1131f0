"""`instructray reproduce`: run the experiments, then write findings/results.json and report.md.

Each experiment's findings are kept in `<out>/experiments/<name>.json` with the
records of the runs they were measured on; a re-run measures again only what is
missing or what was measured on other runs (e.g. more seeds). Runs, findings and the
report are each written whole or not at all, so an interrupted study resumes where
it stopped and never reads half a file.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from orchestration.cluster import connect
from orchestration.reproduce.experiments import EXPERIMENTS
from orchestration.reproduce.report import write_report
from orchestration.reproduce.runs import QUICK, Runs, git_commit, write_json_atomic
from orchestration.reproduce.study import CONFIDENCE, Study
from orchestration.reproduce.verdicts import VERDICTS

log = logging.getLogger(__name__)
DEFAULT_OUT = Path("findings")
SEEDS, QUICK_SEEDS = 3, 1  # full runs behind the multi-seed findings


def _runs_used(study: Study, names: list[str]) -> dict[str, dict]:
    keep = ("seed", "overrides", "commit", "finished", "wall_s")
    return {n: {k: study.runs.record(n)[k] for k in keep} for n in names}


def measure(study: Study, name: str) -> list[dict]:
    """The experiment's findings, from its cache when it was measured on the same runs."""
    exp = EXPERIMENTS[name]
    needed = exp.needs(study)
    for spec in needed:
        study.runs.ensure(spec)
    inputs = {"seeds": list(study.seeds), "runs": _runs_used(study, [s.name for s in needed])}
    cache = study.runs.out / "experiments" / f"{name}.json"
    if cache.exists():
        saved = json.loads(cache.read_text())
        if saved["inputs"] == inputs:
            log.info("reproduce: %s already measured on these runs", name)
            return saved["findings"]
    start = time.perf_counter()
    findings = [{**f, "experiment": name} for f in exp.measure(study)]
    cache.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(cache, {"inputs": inputs, "findings": findings,
                              "measure_s": round(time.perf_counter() - start, 1)})
    return findings


def main(config: str | None, seeds: int | None = None, only: list[str] | None = None, quick: bool = False,
         out: Path = DEFAULT_OUT, overrides: list[str] | None = None) -> dict:
    unknown = sorted(set(only or ()) - set(EXPERIMENTS))
    if unknown:
        raise ValueError(f"--only: no experiment {', '.join(unknown)}; there are {', '.join(EXPERIMENTS)}")
    seeds = seeds or (QUICK_SEEDS if quick else SEEDS)
    if seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {seeds}")
    runs = Runs(Path(out).resolve(), config, tuple((QUICK if quick else []) + list(overrides or [])))
    study = Study(runs, tuple(range(seeds)), quick)
    if study.base.data.source != "synthetic":
        raise ValueError("reproduce needs data.source: synthetic; the findings are judged by its gold labeler")
    connect(study.base)
    commit, start = git_commit(), time.perf_counter()
    findings = []
    for name in only or EXPERIMENTS:
        findings += measure(study, name)
    names = sorted({r for f in findings for r in f["runs"]})
    results = {
        "command": {"config": config, "seeds": seeds, "only": only, "quick": quick,
                    "overrides": list(overrides or [])},
        "commit": commit, "confidence": CONFIDENCE, "verdicts": list(VERDICTS),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "wall_s_this_invocation": round(time.perf_counter() - start, 1),
        "runs": {n: runs.record(n) for n in names},
        "findings": findings,
    }
    write_json_atomic(runs.out / "results.json", results)
    report = write_report(runs.out, results)
    log.info("reproduce: %s", report)
    return results
