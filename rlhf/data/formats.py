"""Canonical record types for every training stage, validated on construction.

Demonstration (SFT), Comparison (reward model, K-way ranking), PromptRecord
(PPO prompts) and TextRecord (pretraining / ptx text). Each is a frozen
dataclass whose `__post_init__` raises `RecordError` on bad content, so a
record that exists is a record the trainers can use. On-disk field names and
examples: docs/data_formats.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Union

MIN_K = 2
MAX_K = 9  # the paper ranks K = 4..9 completions; K = 2 is a chosen/rejected pair


class RecordError(ValueError):
    """A record's content is invalid (missing, empty or mistyped field, bad ranks...)."""


def _check_text(cls_name: str, field: str, value: Any) -> None:
    if value is None:
        raise RecordError(f"{cls_name}: field {field!r} is missing")
    if not isinstance(value, str):
        raise RecordError(f"{cls_name}: field {field!r} must be a string, got {type(value).__name__}")
    # A whitespace-only text trains nothing and usually means a broken export.
    if not value.strip():
        raise RecordError(f"{cls_name}: field {field!r} is empty")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class Demonstration:
    """A labeler-written response to a prompt (SFT)."""
    prompt: str
    response: str

    def __post_init__(self) -> None:
        _check_text("Demonstration", "prompt", self.prompt)
        _check_text("Demonstration", "response", self.response)

    def to_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "response": self.response}


@dataclass(frozen=True)
class Comparison:
    """K ranked responses to one prompt (reward model); lower rank = better.

    Equal ranks are ties and contribute no pair; at least one strictly ordered
    pair is required. `soft_label`, for K = 2 only, is P(responses[0] is
    preferred), e.g. from AI feedback; it must not contradict the ranks.
    """
    prompt: str
    responses: tuple[str, ...]
    ranks: tuple[int, ...]
    soft_label: float | None = None

    def __post_init__(self) -> None:
        _check_text("Comparison", "prompt", self.prompt)
        # Lists are accepted (they come from JSON) and frozen into tuples.
        for name in ("responses", "ranks"):
            value = getattr(self, name)
            if value is None:
                raise RecordError(f"Comparison: field {name!r} is missing")
            if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
                raise RecordError(f"Comparison: field {name!r} must be a list, got {type(value).__name__}")
            object.__setattr__(self, name, tuple(value))
        k = len(self.responses)
        if not MIN_K <= k <= MAX_K:
            raise RecordError(f"Comparison: K = {k} responses, need {MIN_K} <= K <= {MAX_K}")
        for i, r in enumerate(self.responses):
            _check_text("Comparison", f"responses[{i}]", r)
        if len(self.ranks) != k:
            raise RecordError(f"Comparison: {len(self.ranks)} ranks for {k} responses")
        for i, r in enumerate(self.ranks):
            if not _is_int(r):
                raise RecordError(f"Comparison: ranks[{i}] must be an int, got {r!r}")
            if r < 0:
                raise RecordError(f"Comparison: ranks[{i}] = {r} is negative (0 = best)")
        if len(set(self.ranks)) == 1:
            raise RecordError(f"Comparison: all {k} ranks are equal ({self.ranks[0]}), no preference pair")
        self._check_soft_label()

    def _check_soft_label(self) -> None:
        s = self.soft_label
        if s is None:
            return
        if isinstance(s, bool) or not isinstance(s, (int, float)):
            raise RecordError(f"Comparison: soft_label must be a number, got {type(s).__name__}")
        if len(self.responses) != 2:
            raise RecordError(f"Comparison: soft_label needs K = 2, got K = {len(self.responses)}")
        if math.isnan(s) or not 0.0 <= s <= 1.0:
            raise RecordError(f"Comparison: soft_label = {s} is not a probability in [0, 1]")
        first_better = self.ranks[0] < self.ranks[1]
        if (first_better and s < 0.5) or (not first_better and s > 0.5):
            raise RecordError(f"Comparison: soft_label = {s} (P(responses[0] preferred)) "
                              f"contradicts ranks {self.ranks}")
        object.__setattr__(self, "soft_label", float(s))

    @classmethod
    def from_chosen_rejected(cls, prompt: str, chosen: str, rejected: str,
                             soft_label: float | None = None) -> "Comparison":
        return cls(prompt=prompt, responses=(chosen, rejected), ranks=(0, 1), soft_label=soft_label)

    @property
    def k(self) -> int:
        return len(self.responses)

    def pairs(self) -> list[tuple[int, int]]:
        """(better, worse) index pairs with strictly different ranks, in index order."""
        return [(i, j) if self.ranks[i] < self.ranks[j] else (j, i)
                for i in range(self.k) for j in range(i + 1, self.k)
                if self.ranks[i] != self.ranks[j]]

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"prompt": self.prompt, "responses": list(self.responses),
                             "ranks": list(self.ranks)}
        if self.soft_label is not None:
            d["soft_label"] = self.soft_label
        return d


@dataclass(frozen=True)
class PromptRecord:
    """A prompt for PPO rollouts or evaluation."""
    prompt: str

    def __post_init__(self) -> None:
        _check_text("PromptRecord", "prompt", self.prompt)

    def to_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt}


@dataclass(frozen=True)
class TextRecord:
    """Plain text for pretraining / the ptx loss."""
    text: str

    def __post_init__(self) -> None:
        _check_text("TextRecord", "text", self.text)

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text}


Record = Union[Demonstration, Comparison, PromptRecord, TextRecord]
RECORD_TYPES: dict[str, type] = {
    "demonstrations": Demonstration,
    "comparisons": Comparison,
    "prompts": PromptRecord,
    "text": TextRecord,
}
# The on-disk fields `record_from_dict` reads for each kind (what a column mapping may name).
DISK_FIELDS: dict[str, tuple[str, ...]] = {
    "demonstrations": ("prompt", "response"),
    "comparisons": ("prompt", "responses", "ranks", "chosen", "rejected", "soft_label"),
    "prompts": ("prompt",),
    "text": ("text",),
}


def _get(row: Mapping[str, Any], key: str) -> Any:
    # Columnar readers fill a key missing from one row with None (pandas: NaN).
    v = row.get(key)
    return None if isinstance(v, float) and math.isnan(v) else v


def _ranks_from_json(ranks: Any) -> Any:
    # JSON/Arrow can turn a column of ints into floats (one 1.5 somewhere
    # promotes them all); integral floats are taken back as ints.
    if isinstance(ranks, (list, tuple)):
        return [int(r) if isinstance(r, float) and r.is_integer() else r for r in ranks]
    return ranks


def record_from_dict(kind: str, row: Mapping[str, Any]) -> Record:
    """Build the record of `kind` from its on-disk dict; extra keys are ignored."""
    if kind not in RECORD_TYPES:
        raise ValueError(f"unknown record kind {kind!r}; known: {sorted(RECORD_TYPES)}")
    if not isinstance(row, Mapping):
        raise RecordError(f"expected a JSON object, got {type(row).__name__}")
    if kind == "demonstrations":
        return Demonstration(prompt=_get(row, "prompt"), response=_get(row, "response"))
    if kind == "prompts":
        return PromptRecord(prompt=_get(row, "prompt"))
    if kind == "text":
        return TextRecord(text=_get(row, "text"))
    soft = _get(row, "soft_label")
    ranked = _get(row, "responses") is not None or _get(row, "ranks") is not None
    paired = _get(row, "chosen") is not None or _get(row, "rejected") is not None
    if ranked and paired:
        raise RecordError("Comparison: give either responses+ranks or chosen+rejected, not both")
    if paired:
        for key in ("chosen", "rejected"):
            _check_text("Comparison", key, _get(row, key))
        return Comparison.from_chosen_rejected(_get(row, "prompt"), _get(row, "chosen"),
                                               _get(row, "rejected"), soft_label=soft)
    if not ranked:
        raise RecordError("Comparison: needs fields 'responses' and 'ranks' (or 'chosen' and 'rejected')")
    return Comparison(prompt=_get(row, "prompt"), responses=_get(row, "responses"),
                      ranks=_ranks_from_json(_get(row, "ranks")), soft_label=soft)
