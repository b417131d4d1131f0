"""The gold labeler (stands in for the paper's human labelers) and its noisy twin.

Gold score: a response is cut at the first EOS marker and stripped of
surrounding whitespace, then compared to the answer word by word with a
weighted edit distance (insert, delete and swapping two adjacent words cost
1; substituting a word costs 1, or 0.5 when it differs only in case, or 0.5-1
for a number close to the right one in numeric families).
score = 1 - distance / max(len(response words), len(answer words)), clipped
at 0. So: the exact answer scores 1.0, every other word sequence
scores strictly less (the cheapest mistake costs 0.5), extra words are
penalised through the longer length, empty or unrelated text scores 0.

Noisy ranking. The paper's ~73% is the agreement *between* labelers (how
often two of them order a pair the same way), not agreement with a truth it
does not have. Our `agreement` means the same: two of our noisy labelers,
drawing their noise independently, order a pair with distinct gold scores the
same way with probability `agreement`. Each labeler orders it the gold way
with probability a, so agreement = a^2 + (1 - a)^2, hence
a = (1 + sqrt(2 * agreement - 1)) / 2 (0.73 -> 0.839): `labeler_accuracy`.
The labeler ranks a prompt's K responses in gold order, except with
probability q = 2 * (1 - a) it returns a uniformly random permutation, which
orders any given pair correctly half the time: accuracy = 1 - q / 2 = a.
Gold ranks give tied responses equal ranks; a random permutation does not.
"""
from __future__ import annotations

import math
import random
from typing import Sequence

from rlhf.synthetic.tasks import FAMILIES, Task

EOS_MARKERS: tuple[str, ...] = ("<|endoftext|>", "</s>", "<eos>")
# Numbers this far apart (or further) get no closeness credit.
_NUMERIC_SPAN = 10.0


def clean_response(response: str, eos_markers: Sequence[str] = EOS_MARKERS) -> str:
    """The response up to the first EOS marker, without surrounding whitespace."""
    for marker in eos_markers:
        cut = response.find(marker)
        if cut >= 0:
            response = response[:cut]
    return response.strip()


def _as_int(word: str) -> int | None:
    return int(word) if word.isascii() and word.isdigit() else None


def substitution_cost(got: str, want: str, numeric: bool) -> float:
    """Cost of writing `got` where `want` belongs: 0, partial, or 1."""
    if got == want:
        return 0.0
    if numeric:
        a, b = _as_int(got), _as_int(want)
        if a is not None and b is not None:
            return 0.5 + 0.5 * min(1.0, abs(a - b) / _NUMERIC_SPAN)
    if got.lower() == want.lower():
        return 0.5
    return 1.0


def word_edit_distance(got: Sequence[str], want: Sequence[str], numeric: bool = False) -> float:
    """Edit distance over words: insert, delete, `substitution_cost`, and
    swapping two adjacent words (cost 1: a swapped pair is one mistake, not two)."""
    before: list[float] = []
    prev = [float(j) for j in range(len(want) + 1)]
    for i, g in enumerate(got, start=1):
        cur = [float(i)] + [0.0] * len(want)
        for j, w in enumerate(want, start=1):
            cur[j] = min(prev[j] + 1.0, cur[j - 1] + 1.0,
                         prev[j - 1] + substitution_cost(g, w, numeric))
            if i > 1 and j > 1 and g == want[j - 2] and got[i - 2] == w and g != w:
                cur[j] = min(cur[j], before[j - 2] + 1.0)
        before, prev = prev, cur
    return prev[-1]


def gold_score(task: Task, response: str) -> float:
    """Gold quality of `response` for `task`, in [0, 1]; 1.0 only for the answer."""
    got = clean_response(response).split()
    want = task.answer.split()
    if got == want:
        return 1.0
    numeric = FAMILIES[task.family].numeric if task.family in FAMILIES else False
    dist = word_edit_distance(got, want, numeric)
    return max(0.0, 1.0 - dist / max(len(got), len(want), 1))


def ranks_from_scores(scores: Sequence[float]) -> tuple[int, ...]:
    """Rank 0 = best; equal scores share a rank (rank = how many score higher)."""
    return tuple(sum(other > s for other in scores) for s in scores)


def noiseless_ranks(task: Task, responses: Sequence[str]) -> tuple[int, ...]:
    return ranks_from_scores([gold_score(task, r) for r in responses])


def labeler_accuracy(agreement: float) -> float:
    """How often one labeler orders a pair the gold way, given inter-labeler `agreement`."""
    if not 0.5 <= agreement <= 1.0:
        raise ValueError(f"agreement must be in [0.5, 1], got {agreement}")
    return (1.0 + math.sqrt(2.0 * agreement - 1.0)) / 2.0


def random_permutation_probability(agreement: float) -> float:
    """q such that two gold-or-random-permutation labelers agree with each other this often."""
    return 2.0 * (1.0 - labeler_accuracy(agreement))


def rank_responses(task: Task, responses: Sequence[str], rng: random.Random,
                   agreement: float = 0.73) -> tuple[int, ...]:
    """Noisy K-way ranks (0 = best) of `responses`; see the module docstring."""
    q = random_permutation_probability(agreement)
    if rng.random() < q:
        order = list(range(len(responses)))
        rng.shuffle(order)
        return tuple(order)
    return noiseless_ranks(task, responses)
