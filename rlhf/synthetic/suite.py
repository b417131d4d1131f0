"""SyntheticSuite: the embedded default's data, made on demand from one seed.

Every method is a pure function of (seed, settings, split, n): each (purpose,
split) pair has its own seed stream, and a split only keeps prompts it owns by
`split_of`, so "valid"/"test" prompts never appear in "train" data of any kind
(demonstrations, comparisons, RL prompts, or task documents of the corpus).
Prompts are drawn with replacement: a split can repeat a prompt, most of all
the small "add" family.
"""
from __future__ import annotations

import itertools
import random
from typing import Callable, Sequence

from rlhf.data.formats import MAX_K, Comparison, Demonstration, PromptRecord, TextRecord
from rlhf.synthetic.corpus import pretraining_corpus
from rlhf.synthetic.labeler import gold_score, random_permutation_probability, rank_responses
from rlhf.synthetic.tasks import (FAMILIES, SPLITS, Task, corrupt, format_prompt,
                                  format_response, make_task, parse_prompt, split_of)
from rlhf.synthetic.vocab import TASK_WORDS

Sampler = Callable[[list[str]], Sequence[str]]
# Candidate mix for comparisons without a sampler: the answer in about half
# the prompts, otherwise mistakes of graded severity and a few off-topic ones.
CORRECT_CANDIDATE_PROB = 0.5
OFF_TOPIC_PROB = 0.1
_SEVERITIES = (1, 1, 1, 2, 2, 3)
# A run-on: a start of an answer that never stops, longer than any response limit,
# so it reaches the RM truncated, without EOS (what a policy does when it rambles).
RUN_ON_WORDS = (40, 60)
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


class SyntheticSuite:
    def __init__(self, seed: int = 0, labeler_agreement: float = 0.73,
                 demo_noise: float = 0.3, families: Sequence[str] | None = None) -> None:
        random_permutation_probability(labeler_agreement)  # validates the range
        if not 0.0 <= demo_noise <= 1.0:
            raise ValueError(f"demo_noise must be in [0, 1], got {demo_noise}")
        unknown = set(families or ()) - set(FAMILIES)
        if unknown:
            raise ValueError(f"unknown task families {sorted(unknown)}; known: {sorted(FAMILIES)}")
        self.seed = seed
        self.labeler_agreement = labeler_agreement
        self.demo_noise = demo_noise
        self.families: tuple[str, ...] = tuple(families) if families else tuple(FAMILIES)

    def _rng(self, purpose: str, split: str) -> random.Random:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return random.Random(f"suite/{self.seed}/{purpose}/{split}")

    def _tasks(self, purpose: str, split: str, n: int) -> list[Task]:
        rng = self._rng(purpose, split)
        tasks: list[Task] = []
        while len(tasks) < n:
            task = make_task(rng, self.families)
            if split_of(format_prompt(task)) == split:
                tasks.append(task)
        return tasks

    def prompts(self, split: str, n: int) -> list[tuple[Task, str]]:
        """RL / evaluation prompts: (task, formatted prompt)."""
        return [(t, format_prompt(t)) for t in self._tasks("prompts", split, n)]

    def prompt_records(self, split: str, n: int) -> list[PromptRecord]:
        return [PromptRecord(prompt=p) for _, p in self.prompts(split, n)]

    def demonstrations(self, split: str, n: int) -> list[Demonstration]:
        """Labeler demonstrations; a fraction `demo_noise` carry one plausible mistake."""
        noise_rng = self._rng("demonstration-noise", split)
        demos = []
        for task in self._tasks("demonstrations", split, n):
            noisy = noise_rng.random() < self.demo_noise
            answer = corrupt(task, noise_rng, severity=1) if noisy else task.answer
            demos.append(Demonstration(prompt=format_prompt(task), response=format_response(answer)))
        return demos

    @staticmethod
    def _run_on(task: Task, rng: random.Random) -> str:
        words = corrupt(task, rng).split() if rng.random() < 0.5 else task.answer.split()
        length = rng.randint(*RUN_ON_WORDS)
        while len(words) < length:
            words.append(rng.choice(TASK_WORDS) if rng.random() < 0.5
                         else "".join(rng.choice(_LETTERS) for _ in range(rng.randint(1, 8))))
        return " ".join(words)

    def _candidates(self, task: Task, k: int, rng: random.Random, run_on_prob: float = 0.0) -> list[str]:
        answers: list[str] = [task.answer] if rng.random() < CORRECT_CANDIDATE_PROB else []
        while len(answers) < k:
            for _ in range(5):  # prefer distinct candidates; a tie now and then is fine
                kind = rng.random()
                if kind < OFF_TOPIC_PROB:
                    cand = " ".join(rng.choice(TASK_WORDS) for _ in range(rng.randint(1, 6)))
                elif kind < OFF_TOPIC_PROB + run_on_prob:
                    cand = self._run_on(task, rng)
                else:
                    cand = corrupt(task, rng, severity=rng.choice(_SEVERITIES))
                if cand not in answers:
                    break
            answers.append(cand)
        if len({gold_score(task, a) for a in answers}) == 1:
            # All tied (e.g. every "first word" guess wrong) would rank nothing;
            # the answer cannot be among them, so putting it in breaks the tie.
            answers[rng.randrange(k)] = task.answer
        rng.shuffle(answers)
        return [format_response(a) for a in answers]

    def comparisons(self, split: str, n: int, k_min: int = 4, k_max: int = 9,
                    sampler: Sampler | None = None, run_on_prob: float = 0.0) -> list[Comparison]:
        """K-way rankings (K uniform in [k_min, k_max]) by the noisy labeler.

        Without `sampler` the K responses are the answer and its corruptions
        (each other candidate a run-on with probability `run_on_prob`; 0 leaves
        the data exactly as without it), and exactly n comparisons come back.
        With it (the paper ranks policy samples), `sampler` receives the flat
        list of prompts, each repeated K times, and returns one response each;
        empty responses are left out (a record cannot hold them) and a prompt
        whose ranking orders no pair (fewer than 2 responses left, or all
        tied) is dropped, so fewer than n may come back.
        """
        if not 2 <= k_min <= k_max <= MAX_K:
            raise ValueError(f"need 2 <= k_min <= k_max <= {MAX_K}, got {k_min}, {k_max}")
        if not 0.0 <= run_on_prob <= 1.0 - OFF_TOPIC_PROB:
            raise ValueError(f"run_on_prob must be in [0, {1.0 - OFF_TOPIC_PROB}], got {run_on_prob}")
        # Policy samples get prompts, K and labeler draws of their own: rankings of both kinds can be mixed.
        tasks_of, candidates_of, labeler_of = (("comparisons", "comparison-candidates", "labeler") if sampler is None
                                               else ("policy-comparisons", "policy-comparisons-candidates",
                                                     "policy-labeler"))
        tasks = self._tasks(tasks_of, split, n)
        rng = self._rng(candidates_of, split)
        ks = [rng.randint(k_min, k_max) for _ in tasks]
        if sampler is None:
            groups = [self._candidates(t, k, rng, run_on_prob) for t, k in zip(tasks, ks)]
        else:
            flat = [format_prompt(t) for t, k in zip(tasks, ks) for _ in range(k)]
            out = list(sampler(flat))
            if len(out) != len(flat):
                raise ValueError(f"sampler returned {len(out)} responses for {len(flat)} prompts")
            ends = list(itertools.accumulate(ks))
            groups = [out[e - k:e] for e, k in zip(ends, ks)]
        labeler_rng = self._rng(labeler_of, split)
        out_records = []
        for task, group in zip(tasks, groups):
            group = [r for r in group if r.strip()]
            if len(group) < 2:
                continue
            ranks = rank_responses(task, group, labeler_rng, self.labeler_agreement)
            if len(set(ranks)) > 1:
                out_records.append(Comparison(prompt=format_prompt(task),
                                              responses=tuple(group), ranks=ranks))
        return out_records

    def pretraining_text(self, split: str, n: int) -> list[TextRecord]:
        self._rng("pretraining", split)  # validates the split name
        return [TextRecord(text=d) for d in pretraining_corpus(self.seed, n, split)]

    def score(self, prompt_or_task: Task | str, response: str) -> float:
        """Gold score of `response`; a prompt string is parsed back into its task."""
        task = prompt_or_task if isinstance(prompt_or_task, Task) else parse_prompt(prompt_or_task)
        return gold_score(task, response)

    @staticmethod
    def parse_prompt(prompt: str) -> Task:
        return parse_prompt(prompt)
