"""Loaders on small hand-written files: records, counts, and errors that name the line."""
import gzip
import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlhf.data.formats import Comparison, Demonstration, PromptRecord, TextRecord
from rlhf.data.loaders import DataError, load_records, load_records_with_stats, write_jsonl


@pytest.fixture
def load(tmp_path):
    cache = str(tmp_path / "hf-cache")  # keep `datasets`' Arrow cache out of ~/.cache

    def _load(path, kind, **kw):
        return load_records_with_stats(path, kind, cache_dir=cache, **kw)
    return _load


def _write(path, lines):
    path.write_bytes(b"\n".join(l if isinstance(l, bytes) else l.encode() for l in lines) + b"\n")
    return path


def _j(**fields):
    return json.dumps(fields)


SAMPLES = {
    "demonstrations": [Demonstration(prompt="Reverse: abc", response="cba"),
                       Demonstration(prompt="Ünïcödé ✓", response="line1\nline2")],
    "comparisons": [Comparison(prompt="p1", responses=("a", "b", "c", "d"), ranks=(3, 0, 1, 1)),
                    Comparison(prompt="p2", responses=("x", "y"), ranks=(1, 0), soft_label=0.25)],
    "prompts": [PromptRecord(prompt="first"), PromptRecord(prompt="second")],
    "text": [TextRecord(text="Some text.\n\nMore.")],
}


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_write_then_load_round_trip(tmp_path, load, kind, suffix):
    path = tmp_path / f"{kind}{suffix}"
    assert write_jsonl(SAMPLES[kind], path) == len(SAMPLES[kind])
    result = load(path, kind)
    assert result.records == SAMPLES[kind]
    assert (result.n_rows, result.n_filtered) == (len(SAMPLES[kind]), 0)


def test_gz_file_is_really_compressed(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    write_jsonl(SAMPLES["prompts"], path)
    lines = gzip.decompress(path.read_bytes()).decode().splitlines()
    assert [json.loads(l) for l in lines] == [{"prompt": "first"}, {"prompt": "second"}]


def test_jsonl_blank_lines_skipped_and_bad_record_named_by_physical_line(tmp_path, load):
    good = [_j(prompt="a", response="1"), "", _j(prompt="b", response="2"), "   "]
    ok = _write(tmp_path / "ok.jsonl", good)
    assert [r.prompt for r in load(ok, "demonstrations").records] == ["a", "b"]
    bad = _write(tmp_path / "bad.jsonl", good + [_j(prompt="c", response="")])  # line 5, row 2
    with pytest.raises(DataError) as e:
        load(bad, "demonstrations")
    assert f"{bad}: line 5: Demonstration: field 'response' is empty" in str(e.value)


def test_jsonl_comparisons_both_layouts(tmp_path, load):
    path = _write(tmp_path / "c.jsonl", [_j(prompt="p", chosen="good", rejected="bad"),
                                         _j(prompt="q", responses=["a", "b", "c"], ranks=[2, 0, 1])])
    assert load(path, "comparisons").records == [
        Comparison(prompt="p", responses=("good", "bad"), ranks=(0, 1)),
        Comparison(prompt="q", responses=("a", "b", "c"), ranks=(2, 0, 1))]


def test_malformed_json_reports_its_line(tmp_path, load):
    lines = [_j(prompt=f"p{i}") for i in range(5)]
    lines.insert(2, "")  # lines 1-6 fine (one blank), line 7 broken
    path = _write(tmp_path / "m.jsonl", lines + ['{"prompt": "x"'])
    with pytest.raises(DataError) as e:
        load(path, "prompts")
    assert f"{path}: line 7: invalid JSON" in str(e.value)


def test_invalid_utf8_reports_its_line(tmp_path, load):
    path = _write(tmp_path / "u.jsonl", [_j(prompt="a"), "", b'{"prompt": "caf\xe9"}', _j(prompt="d")])
    with pytest.raises(DataError) as e:
        load(path, "prompts")
    assert f"{path}: line 3: invalid UTF-8 (byte 0xe9" in str(e.value)


@pytest.mark.parametrize("content", [b"", b"\n  \n\t\n"])
def test_empty_file(tmp_path, load, content):
    path = tmp_path / "e.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match="file is empty, no records"):
        load(path, "prompts")


def test_type_errors_are_found_on_their_line(tmp_path, load):
    # One int prompt, or one fractional rank, changes the column type for
    # every row in `datasets`; the error must still point at the right line.
    prompts = _write(tmp_path / "t.jsonl", [_j(prompt="a"), _j(prompt="b"), _j(prompt=5)])
    with pytest.raises(DataError, match="line 3: PromptRecord: field 'prompt' must be a string, got int"):
        load(prompts, "prompts")
    ranks = _write(tmp_path / "r.jsonl", [_j(prompt="p", responses=["a", "b"], ranks=[0, 1])] * 2
                   + [_j(prompt="p", responses=["a", "b"], ranks=[0, 1.5])])
    with pytest.raises(DataError, match=r"line 3: Comparison: ranks\[1\] must be an int, got 1.5"):
        load(ranks, "comparisons")


def test_not_an_object_line(tmp_path, load):
    path = _write(tmp_path / "n.jsonl", [_j(prompt="a"), "[1, 2]"])
    with pytest.raises(DataError, match="line 2: expected a JSON object, got list"):
        load(path, "prompts")


def test_json_array_records_and_errors(tmp_path, load):
    ok = tmp_path / "ok.json"
    ok.write_text(json.dumps([{"text": "one"}, {"text": "two"}], indent=1))
    assert load(ok, "text").records == [TextRecord(text="one"), TextRecord(text="two")]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"text": "one"}, {"text": "two"}, {"text": ""}], indent=1))
    with pytest.raises(DataError, match=r"bad.json: record 2: TextRecord: field 'text' is empty"):
        load(bad, "text")
    broken = tmp_path / "broken.json"
    broken.write_text('[{"text": "one"},\n {"text": "two"},\n {"text": "three"]\n')
    with pytest.raises(DataError, match="broken.json: line 3: invalid JSON"):
        load(broken, "text")


CSV_LINES = [
    "prompt,response",   # line 1: header
    '"multi',            # line 2: row 0 starts, quoted field spans two lines
    'line",x',           # line 3
    "",                  # line 4: blank, skipped
    "42,y",              # line 5: row 1 (a numeric-looking prompt stays text)
]


def test_csv_records_multiline_and_numeric_text(tmp_path, load):
    path = _write(tmp_path / "d.csv", CSV_LINES)
    assert load(path, "demonstrations").records == [Demonstration(prompt="multi\nline", response="x"),
                                                     Demonstration(prompt="42", response="y")]


def test_csv_bad_row_names_row_and_line(tmp_path, load):
    path = _write(tmp_path / "d.csv", CSV_LINES + [",z"])  # row 2, line 6: empty prompt
    with pytest.raises(DataError) as e:
        load(path, "demonstrations")
    assert f"{path}: row 2 (line 6): Demonstration: field 'prompt' is empty" in str(e.value)


def test_csv_comparisons_with_json_cells(tmp_path, load):
    path = _write(tmp_path / "c.csv", ["prompt,responses,ranks,soft_label",
                                       'p,"[""a"",""b"",""c""]","[1,0,2]",',
                                       'q,"[""x"",""y""]","[0,1]",0.9'])
    assert load(path, "comparisons").records == [
        Comparison(prompt="p", responses=("a", "b", "c"), ranks=(1, 0, 2)),
        Comparison(prompt="q", responses=("x", "y"), ranks=(0, 1), soft_label=0.9)]


def test_parquet_records_and_bad_row(tmp_path, load):
    ok = tmp_path / "ok.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "responses": [["x", "y"], ["u", "v", "w"]],
                             "ranks": [[0, 1], [2, 1, 0]]}), ok)
    assert load(ok, "comparisons").records == [Comparison(prompt="a", responses=("x", "y"), ranks=(0, 1)),
                                               Comparison(prompt="b", responses=("u", "v", "w"), ranks=(2, 1, 0))]
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b", "c", "d"], "response": ["1", "2", "3", None]}), bad)
    with pytest.raises(DataError, match="bad.parquet: row 3: Demonstration: field 'response' is missing"):
        load(bad, "demonstrations")


def test_prompt_length_filters_counted_and_logged(tmp_path, load, caplog):
    prompts = ["short", "a much longer prompt", "tiny", "xx", "medium len", "another long prompt here"]
    path = _write(tmp_path / "p.jsonl", [_j(prompt=p) for p in prompts])
    too_long = lambda p: p.count(" ") >= 3  # stands in for a token count  # noqa: E731
    expected = [p for p in prompts if len(p) <= 10 and not p.count(" ") >= 3]
    with caplog.at_level(logging.INFO, logger="rlhf.data.loaders"):
        result = load(path, "prompts", max_prompt_chars=10, too_long=too_long)
    assert [r.prompt for r in result.records] == expected == ["short", "tiny", "xx", "medium len"]
    assert (result.n_rows, result.n_filtered) == (6, 2)
    assert "filtered 2 of 6 prompts" in caplog.text
    only_chars = load(path, "prompts", max_prompt_chars=4)
    assert [r.prompt for r in only_chars.records] == [p for p in prompts if len(p) <= 4]
    assert only_chars.n_filtered == sum(len(p) > 4 for p in prompts)


def test_limit_counts_kept_records(tmp_path, load):
    path = _write(tmp_path / "p.jsonl", [_j(prompt=p) for p in ["aaaaaa", "b", "cccccc", "d", "e"]])
    result = load(path, "prompts", limit=2, max_prompt_chars=3)
    assert [r.prompt for r in result.records] == ["b", "d"] and result.n_filtered == 2
    assert load_records(path, "prompts", limit=0, cache_dir=str(tmp_path / "c")) == []


def test_bad_arguments_and_paths(tmp_path, load):
    txt = tmp_path / "x.txt"
    txt.write_text("hello")
    with pytest.raises(DataError, match="unsupported file type"):
        load(txt, "text")
    with pytest.raises(DataError, match="no such file"):
        load(str(tmp_path / "missing.jsonl"), "prompts")
    with pytest.raises(ValueError, match="do not apply to kind='text'"):
        load(txt, "text", max_prompt_chars=5)
    with pytest.raises(ValueError, match="kind must be one of"):
        load(txt, "pairs")


def test_csv_unreadable_lines(tmp_path, load):
    utf = _write(tmp_path / "u.csv", [b"prompt", b"ok", b"caf\xe9"])
    with pytest.raises(DataError, match=r"u.csv: line 3: invalid UTF-8 \(byte 0xe9"):
        load(utf, "prompts")
    ragged = _write(tmp_path / "r.csv", ["prompt,response", "a,b", "c,d,e"])
    with pytest.raises(DataError, match="r.csv: cannot be read .*line 3"):  # pandas' own message
        load(ragged, "demonstrations")
