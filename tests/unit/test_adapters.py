"""Adapters on real public files in the optional local data folder ../shared/data (skipped without it).

Each check recomputes the expected numbers straight from the raw file with
plain json/csv/gzip, not through the adapter's code path.
"""
import csv
import gzip
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from rlhf.data import adapters
from rlhf.data.formats import Comparison, Demonstration, TextRecord

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.fixture(scope="module", autouse=True)
def _fresh_datasets_cache(tmp_path_factory):
    import datasets  # a fresh Arrow cache: the tests must not lean on a stale one

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf-cache")))
        yield


@pytest.fixture(scope="module")
def data_dir():
    if not DATA.is_dir():
        pytest.skip(f"real data not present at {DATA} (only in the instructray workplace)")
    return DATA


def test_hh_rlhf(data_dir):
    path = data_dir / "hh-rlhf" / "harmless-base_test.jsonl.gz"
    raw = [json.loads(l) for l in gzip.open(path, "rt", encoding="utf-8")]
    assert len(raw) == 2312
    ends_empty = re.compile(r"\n\nAssistant:\s*\Z")
    n_empty = sum(bool(ends_empty.search(r["chosen"]) or ends_empty.search(r["rejected"])) for r in raw)
    skipped = Counter()
    recs = adapters.hh_rlhf(path, skipped=skipped)
    # In 2,307 of the 2,312 pairs the two transcripts differ only after the last Assistant turn.
    assert skipped["prefix_mismatch"] == 2312 - 2307
    assert skipped["empty_response"] == n_empty
    assert len(recs) == 2312 - 5 - n_empty - skipped["identical_responses"]
    transcripts = {(r["chosen"], r["rejected"]) for r in raw}
    for c in recs:
        assert isinstance(c, Comparison) and c.ranks == (0, 1) and c.soft_label is None
        assert c.prompt.endswith("\n\nAssistant:")
        assert (c.prompt + c.responses[0], c.prompt + c.responses[1]) in transcripts
        assert not any("\n\nAssistant:" in r for r in c.responses)


def _instances(path):
    return [(t["instruction"], i["input"], i["output"])
            for t in map(json.loads, open(path, encoding="utf-8")) for i in t["instances"]]


@pytest.mark.parametrize("fn, rel, n_tasks", [
    (adapters.alpaca_seed_tasks, "stanford_alpaca/seed_tasks.jsonl", 175),
    (adapters.self_instruct, "self_instruct/user_oriented_instructions.jsonl", 252),
])
def test_instruction_sets(data_dir, fn, rel, n_tasks):
    path = data_dir / rel
    assert sum(1 for _ in open(path, encoding="utf-8")) == n_tasks
    raw = _instances(path)
    recs = fn(path)
    assert len(recs) == len(raw) >= n_tasks
    for d, (instruction, inp, out) in zip(recs, raw):
        expected = instruction.strip() + (f"\n\n{inp.strip()}" if inp.strip() else "")
        assert isinstance(d, Demonstration) and d.prompt == expected and d.response == out


def test_alpaca_template_hand_checked(data_dir):
    recs = adapters.alpaca_seed_tasks(data_dir / "stanford_alpaca" / "seed_tasks.jsonl")
    assert recs[1].prompt == "What is the relation between the given pairs?\n\nNight : Day :: Right : Left"
    assert recs[1].response == "The relation between the given pairs is that they are opposites."


def test_truthfulqa(data_dir):
    path = data_dir / "truthfulqa" / "TruthfulQA.csv"
    rows = list(csv.DictReader(open(path, encoding="utf-8", newline="")))
    assert len(rows) == 817
    skipped = Counter()
    recs = adapters.truthfulqa(path, skipped=skipped)
    assert len(recs) + sum(skipped.values()) == 817
    by_question = {r["Question"].strip(): r for r in rows}
    for c in recs:
        assert 2 <= c.k <= 9
        row = by_question[c.prompt]
        correct = {a.strip() for a in row["Correct Answers"].split(";")} | {row["Best Answer"].strip()}
        incorrect = {a.strip() for a in row["Incorrect Answers"].split(";")}
        assert c.responses[0] == row["Best Answer"].strip() or row["Best Answer"].strip() in incorrect
        assert {0, 1} == set(c.ranks)
        for resp, rank in zip(c.responses, c.ranks):
            assert resp in (correct - incorrect if rank == 0 else incorrect - correct)
        assert len(set(c.responses)) == c.k
    capped = adapters.truthfulqa(path, max_k=4)
    assert len(capped) == len(recs) and all(2 <= c.k <= 4 and set(c.ranks) == {0, 1} for c in capped)


def test_truthfulqa_cap_hand_worked(tmp_path):
    # 4 correct (Best = C3), 6 incorrect, "Unknown" on both sides, max_k = 5:
    # order Best, C1, C2, C4 / I1..I6; alternate Best, I1, C1, I2, C2.
    path = tmp_path / "tqa.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["Type", "Category", "Question", "Best Answer", "Correct Answers", "Incorrect Answers", "Source"])
        w.writerow(["t", "c", "Q?", "C3", "C1; C2; Unknown; C3; C4;", "I1; Unknown; I2; I3; I4; I5; I6", "s"])
        w.writerow(["t", "c", "Only right?", "A", "A; B", "B; A", "s"])
    skipped = Counter()
    recs = adapters.truthfulqa(path, max_k=5, skipped=skipped)
    assert recs == [Comparison(prompt="Q?", responses=("C3", "C1", "C2", "I1", "I2"), ranks=(0, 0, 0, 1, 1))]
    assert skipped == Counter(one_sided=1)  # A and B are on both sides: nothing left


def test_alpaca_eval(data_dir):
    path = data_dir / "alpaca_eval" / "annotations_text_davinci_003_vs_gpt4_turbo.json"
    raw = json.load(open(path, encoding="utf-8"))
    assert len(raw) == 805
    skipped = Counter()
    recs = adapters.alpaca_eval(path, skipped=skipped)
    assert skipped["tie"] == sum(r["preference"] == 1.5 for r in raw)
    assert len(recs) + sum(skipped.values()) == 805
    usable = [r for r in raw if r["preference"] != 1.5 and r["output_1"].strip() and r["output_2"].strip()]
    assert sorted(c.soft_label for c in recs) == pytest.approx(sorted(2 - r["preference"] for r in usable))
    for c in recs:
        assert c.k == 2 and 0.0 <= c.soft_label <= 1.0
        assert c.ranks == ((0, 1) if c.soft_label > 0.5 else (1, 0))
    # preference ~1 means output_1 (here always gpt4_1106_preview) won: ranks (0, 1).
    assert sum(c.ranks == (0, 1) for c in recs) == sum(r["preference"] < 1.5 for r in usable)


def test_tinyshakespeare(data_dir):
    path = data_dir / "tinyshakespeare" / "input.txt"
    text = path.read_text(encoding="utf-8")
    assert text.count("\n") == 40000
    recs = adapters.tinyshakespeare(path, chunk_chars=500)
    assert all(isinstance(r, TextRecord) and len(r.text) <= 500 for r in recs)
    # Nothing lost or invented: same non-whitespace characters, same order.
    assert "".join("".join(r.text.split()) for r in recs) == "".join(text.split())
    assert recs[0].text.startswith("First Citizen:\nBefore we proceed any further, hear me speak.")


@pytest.mark.parametrize("text, limit, expected", [
    ("ab\ncd\n\nef", 5, ["ab\ncd", "ef"]),
    ("ab\ncd\n\nef", 9, ["ab\ncd\n\nef"]),  # exactly at the limit
    ("ab\ncd\n\nef", 3, ["ab", "cd", "ef"]),
    ("abcdefg\n\n\n\nhi", 3, ["abc", "def", "g", "hi"]),
])
def test_text_chunks_hand_worked(text, limit, expected):
    assert adapters.text_chunks(text, limit) == expected


def test_split_hh_transcript_hand_worked():
    c = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: joke?\n\nAssistant: No."
    r = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: joke?\n\nAssistant: Sure!"
    assert adapters.split_hh_transcript(c, r) == (
        "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: joke?\n\nAssistant:", " No.", " Sure!")
    assert adapters.split_hh_transcript(c, r.replace("hello", "hey")) is None
