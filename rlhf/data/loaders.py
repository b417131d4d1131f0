"""Load canonical records from local files or the hub, with errors that name the line.

Local .json / .jsonl / .csv / .parquet files (and .json.gz / .jsonl.gz) go
through the `datasets` library's packaged builders, which need no network.
Any other string is taken as a hub dataset name. Where a record is bad, the
DataError says where, counting as follows (docs/data_formats.md):

- JSON Lines: "line L", the 1-based physical line. Blank lines are skipped by
  `datasets`, so row i is the (i+1)-th non-blank line; we map it back.
- JSON array: "record N", 0-based index into the array.
- CSV: "row N (line L)", N the 0-based data row, L the 1-based physical line
  where the row starts (header is line 1; quoted fields may span lines).
- Parquet and hub datasets: "row N", 0-based.

When `datasets` itself cannot read a JSON/CSV file (malformed JSON, invalid
UTF-8), the file is re-scanned here to name the first bad line.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping

from rlhf.data.formats import RECORD_TYPES, Record, RecordError, TextRecord, record_from_dict

logger = logging.getLogger(__name__)

Kind = Literal["demonstrations", "comparisons", "prompts", "text"]
BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
# CSV cells are read as text (a prompt "42" stays a string); list fields of a
# comparison are JSON-encoded inside their cell.
_CSV_TEXT_COLUMNS = ("prompt", "response", "text", "chosen", "rejected", "responses", "ranks", "soft_label")
_BATCH = 1000


class DataError(ValueError):
    """A data file (or hub dataset) cannot be turned into records; says where."""


@dataclass(frozen=True)
class LoadResult:
    records: list[Record]
    n_rows: int       # rows read (stops early once `limit` records are kept)
    n_filtered: int   # rows dropped because the prompt was too long


def builder_for(path: Path) -> str:
    """The `datasets` packaged builder for a local file, from its suffix (.gz allowed)."""
    suffixes = [s.lower() for s in path.suffixes]
    gz = suffixes[-1:] == [".gz"]
    ext = suffixes[-2 if gz else -1] if len(suffixes) > gz else ""
    if ext not in BUILDERS or (gz and BUILDERS[ext] != "json"):
        raise DataError(f"{path}: unsupported file type; use one of "
                        f"{sorted(BUILDERS)} (.json/.jsonl may be .gz compressed)")
    return BUILDERS[ext]


def _is_local(source: str | Path) -> bool:
    if isinstance(source, Path) or Path(source).exists():
        return True
    return any(str(source).lower().endswith(s) for s in (*BUILDERS, ".gz"))


def load_rows(path: str | Path, split: str = "train", cache_dir: str | None = None):
    """A local file as a `datasets.Dataset` (raw rows, no validation)."""
    import datasets  # heavy import, only when data is actually loaded

    path = Path(path)
    kwargs: dict[str, Any] = {}
    builder = builder_for(path)
    if builder == "csv":
        kwargs = {"keep_default_na": False, "converters": {c: str for c in _CSV_TEXT_COLUMNS}}
    return datasets.load_dataset(builder, data_files={split: str(path)}, split=split,
                                 cache_dir=cache_dir, **kwargs)


def _open_bytes(path: Path):
    return gzip.open(path, "rb") if path.suffix.lower() == ".gz" else open(path, "rb")


def _read_bytes(path: Path) -> bytes:
    with _open_bytes(path) as f:
        return f.read()


def _first_content(path: Path) -> bytes:
    """The file's first non-whitespace bytes (b"" if it has none), read in chunks."""
    with _open_bytes(path) as f:
        while chunk := f.read(1 << 16):
            if chunk.strip(b"\xef\xbb\xbf \t\r\n"):
                return chunk.lstrip(b"\xef\xbb\xbf \t\r\n")
    return b""


def _decode(line: bytes) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecordError(f"invalid UTF-8 (byte 0x{line[e.start]:02x} at byte {e.start + 1} of the line)") from None


def _csv_value(key: str, value: Any) -> Any:
    if not isinstance(value, str) or key not in ("responses", "ranks", "soft_label"):
        return value
    if value.strip() == "":
        return None
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        raise RecordError(f"field {key!r} must be JSON in a CSV cell, got {value[:40]!r}") from None


def _from_row(kind: str, row: Mapping[str, Any], csv_cells: bool,
              columns: Mapping[str, str] | None = None) -> Record:
    if columns:  # our field <- their column, e.g. a hub set's "instruction" as our "prompt"
        missing = [theirs for theirs in columns.values() if theirs not in row]
        if missing:
            raise RecordError(f"no column {missing[0]!r} (mapped in data.columns); the row has {sorted(row)}")
        row = {**row, **{ours: row[theirs] for ours, theirs in columns.items()}}
    if csv_cells:
        row = {k: _csv_value(k, v) for k, v in row.items()}
    return record_from_dict(kind, row)


class _Locator:
    """Names where row i of a local file is, reading the file only when asked."""

    def __init__(self, path: Path, builder: str) -> None:
        self.path, self.builder = path, builder
        self._lines: list[int] | None = None
        self._array: bool | None = None

    def _line_numbers(self) -> list[int]:
        data = _read_bytes(self.path)
        if self.builder == "csv":
            return _csv_row_lines(data)
        return [n for n, line in enumerate(data.split(b"\n"), 1) if line.strip()]

    def __call__(self, i: int) -> str:
        if self.builder == "parquet":
            return f"row {i}"
        if self._array is None:
            self._array = self.builder == "json" and _first_content(self.path).startswith(b"[")
        if self._array:
            return f"record {i}"
        if self._lines is None:
            self._lines = self._line_numbers()
        line = self._lines[i] if i < len(self._lines) else "?"
        return f"row {i} (line {line})" if self.builder == "csv" else f"line {line}"


def _csv_row_lines(data: bytes) -> list[int]:
    text = data.decode("utf-8", errors="replace")
    reader = csv.reader(io.StringIO(text, newline=""))
    starts, last = [], 0
    for row in reader:
        if row and any(cell.strip() for cell in row):  # pandas skips blank lines
            starts.append(last + 1)
        last = reader.line_num
    return starts[1:]  # drop the header


def _json_object(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise RecordError(f"invalid JSON ({e.msg} at column {e.colno})") from None


def _rescan(path: Path, builder: str, kind: str) -> str | None:
    """First problem in a JSON/CSV file that `datasets` failed on, or None."""
    data = _read_bytes(path)
    if builder == "json" and _first_content(path).startswith(b"["):
        return _rescan_json_array(data, kind)
    for n, raw in enumerate(data.split(b"\n"), 1):
        try:
            text = _decode(raw)
            # For CSV only the encoding is checked; pandas' message names other faults.
            if builder == "json" and text.strip():
                _from_row(kind, _json_object(text), csv_cells=False)
        except RecordError as e:
            return f"line {n}: {e}"
    return None


def _rescan_json_array(data: bytes, kind: str) -> str | None:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        return f"line {line}: invalid UTF-8 (byte 0x{data[e.start]:02x})"
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        return f"line {e.lineno}: invalid JSON ({e.msg} at column {e.colno})"
    if not isinstance(rows, list):
        return "a .json file must hold a list of objects (or be JSON Lines)"
    for i, row in enumerate(rows):
        try:
            _from_row(kind, row, csv_cells=False)
        except RecordError as e:
            return f"record {i}: {e}"
    return None


def _open_local(path: Path, kind: str, split: str, cache_dir: str | None):
    """(dataset, locator, csv?, failure) for a local file; failure(e) makes the DataError."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    builder = builder_for(path)
    try:
        empty = builder != "parquet" and not _first_content(path)
    except OSError as e:  # e.g. a .gz that is not gzip
        raise DataError(f"{path}: cannot be read ({e})") from e
    if empty:
        raise DataError(f"{path}: file is empty, no records")

    def failure(e: Exception) -> DataError:
        problem = _rescan(path, builder, kind) if builder != "parquet" else None
        cause = e.__cause__ or e
        return DataError(f"{path}: {problem or f'cannot be read ({type(cause).__name__}: {cause})'}")

    try:
        ds = load_rows(path, split=split, cache_dir=cache_dir)
    except Exception as e:  # datasets wraps parser errors in several types
        raise failure(e) from e
    return ds, _Locator(path, builder), builder == "csv", failure


def _iter_rows(ds, failure: Callable[[Exception], DataError]) -> Iterator[dict[str, Any]]:
    # Some bad input (e.g. invalid UTF-8) only fails when Arrow rows are decoded.
    batches = ds.iter(batch_size=_BATCH)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as e:
            raise failure(e) from e
        keys = list(batch)
        for values in zip(*(batch[k] for k in keys)):
            yield dict(zip(keys, values))


def load_records_with_stats(source: str | Path, kind: Kind, split: str = "train",
                            limit: int | None = None, max_prompt_chars: int | None = None,
                            too_long: Callable[[str], bool] | None = None,
                            cache_dir: str | None = None, columns: Mapping[str, str] | None = None
                            ) -> LoadResult:
    """Like `load_records`, also counting rows read and rows filtered as too long."""
    if kind not in RECORD_TYPES:
        raise ValueError(f"kind must be one of {sorted(RECORD_TYPES)}, got {kind!r}")
    if kind == "text" and (max_prompt_chars is not None or too_long is not None):
        raise ValueError("prompt-length filters do not apply to kind='text'")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if _is_local(source):
        ds, where, csv_cells, failure = _open_local(Path(source), kind, split, cache_dir)
        name = str(source)
    else:
        import datasets

        name = f"hub dataset {source!r} ({split})"
        ds = datasets.load_dataset(str(source), split=split, cache_dir=cache_dir)
        where, csv_cells = (lambda i: f"row {i}"), False
        failure = (lambda e: DataError(f"{name}: cannot be read ({type(e).__name__}: {e})"))
    if len(ds) == 0:
        raise DataError(f"{name}: no records")
    records: list[Record] = []
    n_rows = n_filtered = 0
    for i, row in enumerate(_iter_rows(ds, failure)):
        if limit is not None and len(records) >= limit:
            break
        n_rows += 1
        try:
            rec = _from_row(kind, row, csv_cells, columns)
        except RecordError as e:
            raise DataError(f"{name}: {where(i)}: {e}") from e
        if not isinstance(rec, TextRecord) and _prompt_too_long(rec.prompt, max_prompt_chars, too_long):
            n_filtered += 1
            continue
        records.append(rec)
    if n_filtered:
        logger.info("%s: filtered %d of %d %s with too-long prompts", name, n_filtered, n_rows, kind)
    return LoadResult(records=records, n_rows=n_rows, n_filtered=n_filtered)


def _prompt_too_long(prompt: str, max_chars: int | None, too_long: Callable[[str], bool] | None) -> bool:
    return (max_chars is not None and len(prompt) > max_chars) or (too_long is not None and too_long(prompt))


def load_records(source: str | Path, kind: Kind, split: str = "train", limit: int | None = None,
                 max_prompt_chars: int | None = None, too_long: Callable[[str], bool] | None = None,
                 cache_dir: str | None = None, columns: Mapping[str, str] | None = None) -> list[Record]:
    """Records of `kind` from a local file or hub dataset; raises DataError naming the bad line.

    `limit` caps the number of records returned. Prompts longer than
    `max_prompt_chars`, or for which `too_long(prompt)` is true (e.g. a token
    count > 1024, as in the paper), are dropped and the count logged; use
    `load_records_with_stats` to get the count. `columns` maps our field names to
    the source's columns (`{"prompt": "instruction"}`); unmapped fields keep their names.
    """
    return load_records_with_stats(source, kind, split, limit, max_prompt_chars, too_long, cache_dir,
                                   columns).records


def write_jsonl(records: Iterable[Record], path: str | Path) -> int:
    """Write records in the canonical on-disk format (gzip if the name ends in .gz)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    n = 0
    with opener(path, "wt", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec.to_dict(), ensure_ascii=False) + "\n")
            n += 1
    return n
