"""TruthfulQA written as lm-eval task files: the rows, the YAML lm-eval reads, the MC2 metric."""
from __future__ import annotations

import csv
import importlib.util
import json
import math

import pytest
import yaml

from rlhf.data.lm_eval_tasks import DATA_FILE, METRICS_MODULE, TASKS, write_truthfulqa_tasks

HEADER = ["Type", "Category", "Question", "Best Answer", "Correct Answers", "Incorrect Answers", "Source"]


@pytest.fixture
def tasks_dir(tmp_path):
    path = tmp_path / "TruthfulQA.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(HEADER)
        w.writerow(["A", "Misc", "Is the sky green?", "No", "No; It is blue", "Yes; Unknown", "s"])
        w.writerow(["A", "Misc", "One-sided?", "Yes", "Yes", "", "s"])  # no incorrect answer: skipped
        w.writerow(["A", "Misc", "Where is Paris?", "In France", "France; Unknown", "In Spain; Unknown", "s"])
    return write_truthfulqa_tasks(path, tmp_path / "tasks")


def test_rows_put_the_best_answer_first_and_label_every_choice(tasks_dir):
    rows = [json.loads(line) for line in (tasks_dir / DATA_FILE).read_text().splitlines()]
    assert [r["question"] for r in rows] == ["Is the sky green?", "Where is Paris?"]
    sky, paris = rows
    assert sky["mc1"] == {"choices": ["No", "Yes", "Unknown"], "labels": [1, 0, 0]}
    assert sky["mc2"] == {"choices": ["No", "It is blue", "Yes", "Unknown"], "labels": [1, 1, 0, 0]}
    # "Unknown" is listed on both sides, so it is on neither.
    assert paris["mc2"] == {"choices": ["In France", "France", "In Spain"], "labels": [1, 1, 0]}
    assert paris["best"] == "In France"


def test_yaml_names_the_local_data_and_the_metric(tasks_dir):
    mc1 = yaml.safe_load((tasks_dir / f"{TASKS['mc1']}.yaml").read_text())
    assert mc1["task"] == TASKS["mc1"] and mc1["output_type"] == "multiple_choice"
    assert mc1["dataset_kwargs"]["data_files"]["validation"] == str(tasks_dir / DATA_FILE)
    gen = yaml.safe_load((tasks_dir / f"{TASKS['gen']}.yaml").read_text())
    assert gen["output_type"] == "generate_until" and gen["generation_kwargs"]["until"] == ["\n"]
    mc2_text = (tasks_dir / f"{TASKS['mc2']}.yaml").read_text()
    assert f"process_results: !function {METRICS_MODULE}.mc2" in mc2_text


def test_mc2_is_the_normalised_likelihood_on_correct_answers(tasks_dir):
    spec = importlib.util.spec_from_file_location("m", tasks_dir / f"{METRICS_MODULE}.py")
    metrics = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(metrics)
    doc = {"mc2": {"labels": [1, 1, 0, 0]}}
    logliks = [-1.0, -3.0, -2.0, -900.0]  # -900: exp underflows unless shifted first
    p = [math.exp(x) for x in logliks]
    want = (p[0] + p[1]) / sum(p)
    assert metrics.mc2(doc, [(x, False) for x in logliks])["acc"] == pytest.approx(want, rel=1e-12)
    big = [x + 1000.0 for x in logliks]  # exp(999) overflows a float without the shift
    assert metrics.mc2(doc, [(x, False) for x in big])["acc"] == pytest.approx(want, rel=1e-9)
