"""Adapters: small copies of real public datasets -> canonical records (docs/data_formats.md).

One function per set. Each takes the file path, returns canonical records,
and, where it drops items, counts them by reason in the optional `skipped`
Counter (and logs the totals). JSON Lines and CSV files go through `datasets`
(`loaders.load_rows`); plain Python is used where the file's structure makes
that simpler (alpaca_eval: see its docstring; tinyshakespeare: plain text).
"""
from __future__ import annotations

import json
import logging
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from rlhf.data.formats import MAX_K, MIN_K, Comparison, Demonstration, RecordError, TextRecord
from rlhf.data.loaders import load_rows

logger = logging.getLogger(__name__)

ASSISTANT_MARKER = "\n\nAssistant:"


def _log_skipped(name: str, kept: int, skipped: Counter) -> None:
    if skipped:
        logger.info("%s: kept %d, skipped %s", name, kept, dict(skipped))


def split_hh_transcript(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """(prompt, chosen_response, rejected_response), or None if the dialogues differ earlier.

    The prompt runs up to and including each transcript's last "\\n\\nAssistant:"
    marker, so prompt + response gives back the transcript exactly (the
    response keeps its leading space).
    """
    cut_c, cut_r = chosen.rfind(ASSISTANT_MARKER), rejected.rfind(ASSISTANT_MARKER)
    if cut_c < 0 or cut_r < 0:
        return None
    end_c, end_r = cut_c + len(ASSISTANT_MARKER), cut_r + len(ASSISTANT_MARKER)
    if chosen[:end_c] != rejected[:end_r]:
        return None
    return chosen[:end_c], chosen[end_c:], rejected[end_r:]


def hh_rlhf(path: str | Path, skipped: Counter | None = None) -> list[Comparison]:
    """Anthropic HH-RLHF chosen/rejected transcripts -> K = 2 comparisons.

    Skipped (counted): "prefix_mismatch" (the two transcripts differ before
    their last Assistant turn), "empty_response", "identical_responses".
    """
    skipped = Counter() if skipped is None else skipped
    out: list[Comparison] = []
    for row in load_rows(path):
        parts = split_hh_transcript(row["chosen"], row["rejected"])
        if parts is None:
            skipped["prefix_mismatch"] += 1
            continue
        prompt, chosen, rejected = parts
        if not chosen.strip() or not rejected.strip():
            skipped["empty_response"] += 1
        elif chosen == rejected:
            skipped["identical_responses"] += 1
        else:
            out.append(Comparison.from_chosen_rejected(prompt, chosen, rejected))
    _log_skipped(f"hh_rlhf {path}", len(out), skipped)
    return out


def instruction_prompt(instruction: str, input_text: str | None) -> str:
    """The instruction alone, or instruction, a blank line, then the input."""
    instruction = instruction.strip()
    if input_text is None or not input_text.strip():
        return instruction
    return f"{instruction}\n\n{input_text.strip()}"


def _instruction_demos(path: str | Path, name: str, skipped: Counter | None) -> list[Demonstration]:
    skipped = Counter() if skipped is None else skipped
    out: list[Demonstration] = []
    for task in load_rows(path):
        for inst in task["instances"]:
            try:
                out.append(Demonstration(prompt=instruction_prompt(task["instruction"], inst["input"]),
                                         response=inst["output"]))
            except RecordError:
                skipped["invalid"] += 1
    _log_skipped(f"{name} {path}", len(out), skipped)
    return out


def alpaca_seed_tasks(path: str | Path, skipped: Counter | None = None) -> list[Demonstration]:
    """Stanford Alpaca's 175 human-written seed tasks, one demonstration per instance."""
    return _instruction_demos(path, "alpaca_seed_tasks", skipped)


def self_instruct(path: str | Path, skipped: Counter | None = None) -> list[Demonstration]:
    """Self-Instruct's 252 user-oriented instructions, one demonstration per instance."""
    return _instruction_demos(path, "self_instruct", skipped)


def _answers(cell: str) -> list[str]:
    # "a; b; c" -- a few rows end with ";" or miss the space; drop empties and repeats.
    return list(dict.fromkeys(a.strip() for a in cell.split(";") if a.strip()))


def _cap_answers(correct: list[str], incorrect: list[str], max_k: int) -> tuple[list[str], list[str]]:
    """Keep at most max_k answers, alternating correct/incorrect from the front."""
    if len(correct) + len(incorrect) <= max_k:
        return correct, incorrect
    n_c = n_i = 0
    while n_c + n_i < max_k:
        take_correct = (n_c <= n_i and n_c < len(correct)) or n_i >= len(incorrect)
        n_c, n_i = (n_c + 1, n_i) if take_correct else (n_c, n_i + 1)
    return correct[:n_c], incorrect[:n_i]


@dataclass(frozen=True)
class TruthfulQAItem:
    """One TruthfulQA question with its answers, the Best Answer first among the correct ones."""
    question: str
    correct: tuple[str, ...]
    incorrect: tuple[str, ...]


def truthfulqa_items(path: str | Path, skipped: Counter | None = None) -> list[TruthfulQAItem]:
    """TruthfulQA rows -> questions with all their correct and incorrect answers.

    An answer listed as both correct and incorrect (e.g. "Unknown") is dropped
    from both. Skipped (counted): "one_sided" (no correct or no incorrect answer left).
    """
    skipped = Counter() if skipped is None else skipped
    out: list[TruthfulQAItem] = []
    for row in load_rows(path):
        best = row["Best Answer"].strip()
        correct = _answers(row["Correct Answers"])
        correct = [best] + [a for a in correct if a != best] if best else correct
        incorrect = _answers(row["Incorrect Answers"])
        both = set(correct) & set(incorrect)
        correct = [a for a in correct if a not in both]
        incorrect = [a for a in incorrect if a not in both]
        if not correct or not incorrect:
            skipped["one_sided"] += 1
            continue
        out.append(TruthfulQAItem(row["Question"].strip(), tuple(correct), tuple(incorrect)))
    _log_skipped(f"truthfulqa {path}", len(out), skipped)
    return out


def truthfulqa(path: str | Path, max_k: int = MAX_K, skipped: Counter | None = None) -> list[Comparison]:
    """TruthfulQA questions -> K-way comparisons: every correct answer above every incorrect.

    Correct answers all get rank 0 (ties), incorrect rank 1, the Best Answer
    first (see `truthfulqa_items`). Over max_k answers, they are taken
    alternately correct/incorrect in file order, so both sides survive.
    """
    if not MIN_K <= max_k <= MAX_K:
        raise ValueError(f"max_k must be in [{MIN_K}, {MAX_K}], got {max_k}")
    out: list[Comparison] = []
    for item in truthfulqa_items(path, skipped):
        correct, incorrect = _cap_answers(list(item.correct), list(item.incorrect), max_k)
        out.append(Comparison(prompt=item.question, responses=tuple(correct + incorrect),
                              ranks=(0,) * len(correct) + (1,) * len(incorrect)))
    return out


def alpaca_eval_comparison(row: dict[str, Any]) -> Comparison | str:
    """One AlpacaEval annotation -> a K = 2 comparison, or the reason it is skipped."""
    pref = row.get("preference")
    if not isinstance(pref, (int, float)) or math.isnan(pref) or not 1.0 <= pref <= 2.0:
        return "bad_preference"
    if pref == 1.5:
        return "tie"
    soft = 2.0 - pref  # P(output_1 preferred): preference 1 -> output_1 wins, 2 -> output_2
    ranks = (0, 1) if pref < 1.5 else (1, 0)
    try:
        return Comparison(prompt=row.get("instruction"), responses=(row.get("output_1"), row.get("output_2")),
                          ranks=ranks, soft_label=soft)
    except RecordError:
        return "invalid"


def alpaca_eval(path: str | Path, skipped: Counter | None = None) -> list[Comparison]:
    """AlpacaEval pairwise AI-feedback annotations -> K = 2 comparisons with soft labels.

    Read with `json` rather than `datasets`: the file is one JSON array whose
    nested `raw_completion` field (which we drop) makes `datasets` spend
    seconds inferring a schema on every load, for 4 fields we need.
    Skipped (counted): "tie" (preference exactly 1.5), "bad_preference"
    (missing or outside [1, 2]), "invalid" (e.g. an empty output).
    """
    skipped = Counter() if skipped is None else skipped
    with open(path, encoding="utf-8") as f:
        rows = json.load(f)
    out: list[Comparison] = []
    for row in rows:
        result = alpaca_eval_comparison(row)
        if isinstance(result, str):
            skipped[result] += 1
        else:
            out.append(result)
    _log_skipped(f"alpaca_eval {path}", len(out), skipped)
    return out


def _pieces(paragraph: str, limit: int) -> Iterable[str]:
    """A paragraph cut at line ends (or hard, for a single huge line) into <= limit chars."""
    buf = ""
    for line in paragraph.split("\n"):
        while len(line) > limit:
            if buf:
                yield buf
                buf = ""
            yield line[:limit]
            line = line[limit:]
        if buf and len(buf) + 1 + len(line) > limit:
            yield buf
            buf = ""
        buf = f"{buf}\n{line}" if buf else line
    if buf:
        yield buf


def text_chunks(text: str, chunk_chars: int) -> list[str]:
    """Blank-line separated paragraphs packed greedily into chunks of <= chunk_chars."""
    if chunk_chars < 1:
        raise ValueError(f"chunk_chars must be >= 1, got {chunk_chars}")
    paragraphs = [p.strip("\n") for p in text.replace("\r\n", "\n").split("\n\n")]
    chunks: list[str] = []
    buf = ""
    for para in (p for p in paragraphs if p.strip()):
        for piece in _pieces(para, chunk_chars):
            if buf and len(buf) + 2 + len(piece) > chunk_chars:
                chunks.append(buf)
                buf = ""
            buf = f"{buf}\n\n{piece}" if buf else piece
    if buf:
        chunks.append(buf)
    return [c for c in chunks if c.strip()]


def tinyshakespeare(path: str | Path, chunk_chars: int = 1000) -> list[TextRecord]:
    """Tiny Shakespeare -> text records of whole speeches packed up to chunk_chars.

    Plain Python: a .txt file has no records to parse; we split it into
    paragraphs (speeches) and pack them so no speech is cut unless it alone
    exceeds chunk_chars.
    """
    text = Path(path).read_text(encoding="utf-8")
    return [TextRecord(text=c) for c in text_chunks(text, chunk_chars)]
