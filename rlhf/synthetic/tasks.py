"""Task families of the synthetic instruction suite, and the prompt format.

Format (one prompt, then the response on the same line)::

    Instruction: reverse the words
    Input: red fox cup
    Response: cup fox red

`format_prompt` gives everything up to and including "Response:"; the response
is the answer with one leading space (" cup fox red"), which is how BPE
tokenizers attach a space to the following word. The model should end the
response with EOS; nothing of the format follows the answer.

Every family builds its answer from the input text alone (`solve`), so a
prompt string is enough to recover the task (`parse_prompt`): actors that only
see text can still be scored. All randomness comes from the `random.Random`
passed in, never from the global generator.
"""
from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from typing import Callable

from rlhf.synthetic.vocab import TASK_WORDS

PROMPT_TEMPLATE = "Instruction: {instruction}\nInput: {input}\nResponse:"
_PROMPT_RE = re.compile(r"^Instruction: (.+)\nInput: (.*)\nResponse:$")
MAX_ADDEND = 15


@dataclass(frozen=True)
class Task:
    family: str
    instruction: str
    input: str
    answer: str


@dataclass(frozen=True)
class Family:
    """One task family: how inputs are drawn, how they are solved.

    `wrong_task` is the family's typical confusion (doing a neighbouring task),
    used by `corrupt` as one of the plausible mistakes.
    """
    name: str
    instruction: str
    make_input: Callable[[random.Random], str]
    solve: Callable[[str], str]
    wrong_task: Callable[[str, random.Random], str]
    numeric: bool = False

    def make(self, rng: random.Random) -> Task:
        text = self.make_input(rng)
        return Task(self.name, self.instruction, text, self.solve(text))


def _words(lo: int, hi: int, distinct: bool = True) -> Callable[[random.Random], str]:
    def make(rng: random.Random) -> str:
        n = rng.randint(lo, hi)
        picked = rng.sample(TASK_WORDS, n) if distinct else [rng.choice(TASK_WORDS) for _ in range(n)]
        return " ".join(picked)
    return make


def _add_input(rng: random.Random) -> str:
    return f"{rng.randint(0, MAX_ADDEND)} + {rng.randint(0, MAX_ADDEND)}"


def _add_solve(text: str) -> str:
    a, b = text.split(" + ")
    return str(int(a) + int(b))


def _rev(text: str) -> str:
    return " ".join(reversed(text.split()))


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("reverse", "reverse the words", _words(3, 6), _rev,
           lambda text, rng: text),
    Family("sort", "sort the words", _words(3, 6),
           lambda text: " ".join(sorted(text.split())),
           lambda text, rng: text),
    Family("copy", "copy the words", _words(2, 6), lambda text: text,
           lambda text, rng: _rev(text)),
    Family("uppercase", "uppercase the words", _words(2, 4), str.upper,
           lambda text, rng: text),
    Family("count", "count the words", _words(1, 9, distinct=False),
           lambda text: str(len(text.split())),
           lambda text, rng: str(len(text.split()[0])),  # counts letters instead
           numeric=True),
    Family("add", "add the numbers", _add_input, _add_solve,
           lambda text, rng: rng.choice(text.split(" + ")), numeric=True),
    Family("first", "give the first word", _words(2, 6),
           lambda text: text.split()[0], lambda text, rng: text.split()[-1]),
    Family("last", "give the last word", _words(2, 6),
           lambda text: text.split()[-1], lambda text, rng: text.split()[0]),
)}
_BY_INSTRUCTION = {f.instruction: f for f in FAMILIES.values()}


def make_task(rng: random.Random, families: tuple[str, ...] | None = None) -> Task:
    """A task from a family drawn uniformly from `families` (all by default)."""
    names = families or tuple(FAMILIES)
    return FAMILIES[rng.choice(names)].make(rng)


def format_prompt(task: Task) -> str:
    return PROMPT_TEMPLATE.format(instruction=task.instruction, input=task.input)


def format_response(answer: str) -> str:
    """The response text as the model should produce it (before EOS)."""
    return " " + answer


def parse_prompt(prompt: str) -> Task:
    """Recover the Task from a formatted prompt; ValueError if it is not one."""
    m = _PROMPT_RE.match(prompt.strip("\n"))
    if m is None or m.group(1) not in _BY_INSTRUCTION:
        raise ValueError(f"not a synthetic-suite prompt: {prompt!r}")
    family = _BY_INSTRUCTION[m.group(1)]
    try:
        answer = family.solve(m.group(2))
    except (ValueError, IndexError) as e:
        raise ValueError(f"malformed input for {family.name}: {m.group(2)!r}") from e
    return Task(family.name, family.instruction, m.group(2), answer)


SPLITS = ("train", "valid", "test")
_SPLIT_PERCENT = (80, 10, 10)


def split_of(text: str) -> str:
    """The split a prompt (or document) belongs to, by a stable hash of its text.

    Splits own disjoint sets of texts, so a held-out prompt can never be drawn
    for train, whatever the seed (Python's hash() is salted, blake2b is not).
    """
    bucket = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") % 100
    edge = 0
    for split, pct in zip(SPLITS, _SPLIT_PERCENT):
        edge += pct
        if bucket < edge:
            return split
    raise AssertionError("split percentages must sum to 100")


# --- plausible mistakes: each maps (task, answer words, rng) -> new words ---

def _swap(task: Task, w: list[str], rng: random.Random) -> list[str]:
    spots = [i for i in range(len(w) - 1) if w[i] != w[i + 1]]
    if not spots:
        return w
    i = rng.choice(spots)
    return w[:i] + [w[i + 1], w[i]] + w[i + 2:]


def _drop(task: Task, w: list[str], rng: random.Random) -> list[str]:
    if len(w) < 2:
        return w
    i = rng.randrange(len(w))
    return w[:i] + w[i + 1:]


def _repeat(task: Task, w: list[str], rng: random.Random) -> list[str]:
    i = rng.randrange(len(w)) if w else 0
    return w[:i + 1] + w[i:i + 1] + w[i + 1:]


def _replace(task: Task, w: list[str], rng: random.Random) -> list[str]:
    if not w:
        return w
    i = rng.randrange(len(w))
    new = rng.choice(TASK_WORDS)
    new = new.upper() if task.family == "uppercase" else new
    return w[:i] + [new] + w[i + 1:]


def _lower_one(task: Task, w: list[str], rng: random.Random) -> list[str]:
    if not w:
        return w
    i = rng.randrange(len(w))
    return w[:i] + [w[i].lower()] + w[i + 1:]


def _wrong_task(task: Task, w: list[str], rng: random.Random) -> list[str]:
    return FAMILIES[task.family].wrong_task(task.input, rng).split()


def _off_by(task: Task, w: list[str], rng: random.Random) -> list[str]:
    try:
        n = int(w[0]) if len(w) == 1 else int(task.answer)
    except ValueError:
        n = int(task.answer)
    return [str(max(0, n + rng.choice((-2, -1, 1, 1, 2, 3))))]


_WORD_MISTAKES = (_swap, _drop, _repeat, _replace, _wrong_task)
_MISTAKES: dict[str, tuple] = {
    "uppercase": _WORD_MISTAKES + (_lower_one,),
    "count": (_off_by, _off_by, _wrong_task),
    "add": (_off_by, _off_by, _wrong_task),
    "first": (_replace, _wrong_task, _repeat),
    "last": (_replace, _wrong_task, _repeat),
}


def corrupt(task: Task, rng: random.Random, severity: int = 1) -> str:
    """A wrong answer made of `severity` plausible mistakes; never the answer."""
    ops = _MISTAKES.get(task.family, _WORD_MISTAKES)
    for _ in range(20):
        words = task.answer.split()
        for _ in range(severity):
            words = rng.choice(ops)(task, words, rng)
        if words and words != task.answer.split():
            return " ".join(words)
    # Mistakes can cancel out (e.g. a swap undone); a repeated word never does.
    return " ".join(_repeat(task, task.answer.split(), rng))
