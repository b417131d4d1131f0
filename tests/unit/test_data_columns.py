"""data.columns: a source's own column names mapped onto our record fields (e.g. a hub set's)."""
from __future__ import annotations

import json

import pytest

from orchestration import stage_data
from rlhf.config import ConfigError, load_config
from rlhf.data import DataError, Demonstration, load_records

DOLLY_LIKE = [{"instruction": f"Name a colour {i}", "context": "", "response": f"blue {i}", "category": "qa"}
              for i in range(40)]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_columns_map_onto_fields_and_a_missing_one_names_the_line(tmp_path):
    f = _write(tmp_path / "dolly.jsonl", DOLLY_LIKE)
    recs = load_records(f, "demonstrations", columns={"prompt": "instruction"})
    assert recs[3] == Demonstration(prompt="Name a colour 3", response="blue 3")
    with pytest.raises(DataError, match=r"dolly\.jsonl: line 1: Demonstration: field 'prompt' is missing"):
        load_records(f, "demonstrations")  # unmapped: our own name is looked for
    with pytest.raises(DataError, match=r"line 1: no column 'question'"):
        load_records(f, "demonstrations", columns={"prompt": "question"})


def test_the_config_mapping_reaches_the_stage_data(tmp_path):
    demos = _write(tmp_path / "d.jsonl", DOLLY_LIKE)
    prompts = _write(tmp_path / "p.jsonl", [{"instruction": r["instruction"]} for r in DOLLY_LIKE])
    text = _write(tmp_path / "t.jsonl", [{"body": f"some text {i}"} for i in range(40)])
    comps = _write(tmp_path / "c.jsonl", [{"question": r["instruction"], "good": "a", "bad": "b"} for r in DOLLY_LIKE])
    cfg = load_config(None, [
        f"run.output_dir={tmp_path / 'run'}", "data.source=files", f"data.demonstrations={demos}",
        f"data.prompts={prompts}", f"data.pretrain_text={text}", f"data.comparisons={comps}",
        "data.columns.demonstrations.prompt=instruction", "data.columns.prompts.prompt=instruction",
        "data.columns.pretrain_text.text=body", "data.columns.comparisons.prompt=question",
        "data.columns.comparisons.chosen=good", "data.columns.comparisons.rejected=bad"])
    records = stage_data.file_records(cfg)
    everything = [r for split in ("train", "valid", "test") for r in records[f"demonstrations_{split}"]]
    assert sorted(r.prompt for r in everything) == sorted(r["instruction"] for r in DOLLY_LIKE)
    assert all(c.responses == ("a", "b") for s in ("train", "valid", "test") for c in records[f"comparisons_{s}"])
    assert sum(len(records[f"pretrain_{s}"]) for s in ("train", "valid", "test")) == 40


def test_a_mapping_that_would_be_ignored_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.columns\.demonstrations.*only read when data\.source is files"):
        load_config(None, ["data.columns.demonstrations.prompt=instruction"])
    with pytest.raises(ConfigError, match=r"'answer' is not a field of demonstrations"):
        load_config(None, ["data.source=files", "data.demonstrations=a", "data.comparisons=b", "data.prompts=c",
                           "data.pretrain_text=d", "data.columns.demonstrations.answer=output"])

