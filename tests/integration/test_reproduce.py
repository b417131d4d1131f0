"""`instructray reproduce --quick`, killed part-way and run again, as a user would.

Checks the machinery, not the paper: every experiment's findings are in
results.json and report.md, each verdict follows its stated rule from the recorded
numbers (recomputed here independently), every run records its config, seed and
commit, and a killed study resumes without repeating finished runs or leaving a
half-written file.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestration.reproduce.experiments import EXPERIMENTS

ROOT = Path(__file__).resolve().parents[2]
VERDICTS = {"reproduced", "not reproduced", "inconclusive"}


def _start(out: Path, ray_local) -> subprocess.Popen:
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    return subprocess.Popen([sys.executable, "-m", "orchestration.cli", "reproduce", "--quick", "--out", str(out)],
                            cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _leaf(test: str, lo: float, hi: float, bound: float) -> str:
    if test == "below":
        lo, hi, bound = -hi, -lo, -bound
    if test in ("above", "below"):
        return "reproduced" if lo > bound else "not reproduced" if hi < bound else "inconclusive"
    if -bound < lo and hi < bound:
        return "reproduced"
    return "not reproduced" if lo >= bound or hi <= -bound else "inconclusive"


def _verdict(rule: dict, measured: dict) -> str:
    """The rule's verdict, by this file's own reading of the rule tree."""
    if "test" in rule:
        return _leaf(rule["test"], *measured[rule["quantity"]]["ci95"], rule["bound"])
    if "requires" in rule:
        if _verdict(rule["requires"], measured) != "reproduced":
            return "inconclusive"
        return _verdict(rule["then"], measured)
    (kind, parts), = rule.items()
    got = [_verdict(p, measured) for p in parts]
    if kind == "all_of":
        return ("not reproduced" if "not reproduced" in got else
                "reproduced" if set(got) == {"reproduced"} else "inconclusive")
    if kind == "any_of":
        return ("reproduced" if "reproduced" in got else
                "not reproduced" if set(got) == {"not reproduced"} else "inconclusive")
    assert kind == "sweep"
    return "not reproduced" if "not reproduced" in got else "reproduced" if "reproduced" in got else "inconclusive"


def _every_json_whole(out: Path) -> None:
    for path in list(out.glob("runs/*/reproduce.json")) + list(out.glob("experiments/*.json")) + \
            list(out.glob("results.json")):
        json.loads(path.read_text())  # a half-written file would not parse
    assert not list(out.rglob(".*.tmp-*")), "a temporary file was left behind"


@pytest.mark.timeout(900)
def test_quick_study_survives_a_kill_and_reports_every_finding(ray_local, tmp_path):
    out = tmp_path / "findings"
    # 1. Killed once the first full run is finished (its record written).
    proc = _start(out, ray_local)
    record = out / "runs" / "seed0" / "reproduce.json"
    deadline = time.time() + 600
    while not record.exists():
        assert proc.poll() is None, f"reproduce exited early:\n{proc.stdout.read()[-3000:]}"
        assert time.time() < deadline, "no run finished in 10 minutes"
        time.sleep(0.2)
    time.sleep(3)  # into the next run
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 120
    while ray_local.available_resources().get("CPU", 0) < 2 - 1e-6 and time.time() < deadline:
        time.sleep(0.2)  # Ray ends the dead driver's actors and workers
    _every_json_whole(out)
    assert not (out / "results.json").exists()
    first = json.loads(record.read_text())

    # 2. Run again: it finishes, and the finished run is not repeated.
    proc = _start(out, ray_local)
    log, _ = proc.communicate(timeout=800)
    assert proc.returncode == 0, log[-4000:]
    assert json.loads(record.read_text()) == first
    _every_json_whole(out)

    results = json.loads((out / "results.json").read_text())
    report = (out / "report.md").read_text()
    assert {f["experiment"] for f in results["findings"]} == set(EXPERIMENTS)
    for f in results["findings"]:
        assert f["claim"] and f["paper"] and f["rule_text"]
        assert f["verdict"] in VERDICTS
        assert f["verdict"] == _verdict(f["rule"], f["measured"]), f["name"]
        for q, m in f["measured"].items():
            lo, hi = m["ci95"]
            assert lo <= hi and m["seeds"] == [0], q
            assert f"{m['value']:.3f} [{lo:.3f}, {hi:.3f}]" in report, q  # the report prints what was recorded
        assert f"**{f['verdict']}**" in report and f["claim"] in report
        assert set(f["runs"]) <= set(results["runs"])
    for name, r in results["runs"].items():
        assert r["seed"] == 0 and r["config"]["run"]["seed"] == 0
        assert r["config"]["run"]["output_dir"] == str(out.resolve() / "runs" / name)
        assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?|unknown", r["commit"]), r["commit"]
    # PPO-only runs borrowed the first seed's stages 0-2 rather than training their own.
    assert results["runs"]["kl_x100"]["borrowed_stages_from"] == "seed0"
    assert (out / "runs" / "kl_x100" / "sft").is_symlink()
    for plot in ("preference", "ptx_sweep", "kl_sweep", "over_optimisation"):
        assert (out / "plots" / f"{plot}.png").stat().st_size > 1000

    # 3. A third invocation measures nothing again: every experiment is cached.
    start = time.time()
    proc = _start(out, ray_local)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log[-4000:]
    assert log.count("already measured on these runs") == len(EXPERIMENTS)
    assert time.time() - start < 60
