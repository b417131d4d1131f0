"""Built-in pretraining corpus: short templated English documents.

A document is a tiny story (2-5 sentences) about a few entities drawn once, so
later sentences reuse them and the LM has something to predict beyond word
frequencies. A fraction TASK_DOC_FRACTION of documents are instead one
task-format example (prompt + response): its response is the correct answer
only with probability CORRECT_ANSWER_FRACTION, otherwise the input words in
shuffled order (a random number for numeric tasks). So the base model learns
the format and the vocabulary, but not how to solve the tasks: that is left to
SFT and RL, like the paper's base GPT-3 that had seen instructions on the web.

Splits: each split draws from its own seed stream and keeps only documents it
owns by `split_of` (of the prompt, for task documents), so held-out text and
held-out prompts never appear in the training corpus.
"""
from __future__ import annotations

import random

from rlhf.synthetic import vocab as V
from rlhf.synthetic.tasks import (FAMILIES, MAX_ADDEND, format_prompt,
                                  format_response, make_task, split_of)

TASK_DOC_FRACTION = 0.2
CORRECT_ANSWER_FRACTION = 0.1
_IRREGULAR_PLURALS = {"sheep": "sheep", "fish": "fish", "deer": "deer",
                      "mouse": "mice", "leaf": "leaves", "moth": "moths"}


def plural(noun: str) -> str:
    if noun in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[noun]
    if noun.endswith(("s", "x", "sh", "ch")):
        return noun + "es"
    return noun + "s"


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _story(rng: random.Random) -> str:
    """2-5 sentences about one cast (a person, an animal, a thing, a place)."""
    name = rng.choice(V.NAMES).capitalize()
    friend = rng.choice([n for n in V.NAMES if n.capitalize() != name]).capitalize()
    animal, thing, place = rng.choice(V.ANIMALS), rng.choice(V.OBJECTS), rng.choice(V.PLACES)
    colour, colour2 = rng.sample(V.COLOURS, 2)
    adj, adj2 = rng.sample(V.ADJECTIVES, 2)
    verb, motion = rng.choice(V.VERBS), rng.choice(V.MOTION_VERBS)
    prep = rng.choice(V.PREPOSITIONS)
    n = rng.randint(2, 9)
    a, b = rng.randint(0, 10), rng.randint(0, 10)
    sentences = [
        f"the {adj} {animal} {motion[1]} {prep} the {place}.",
        f"{name} {verb[1]} {_a(colour)} {thing}.",
        f"{name} {verb[2]} {V.NUMBER_WORDS[n]} {colour} {plural(thing)}.",
        f"where is the {animal}? The {animal} is {prep} the {place}.",
        f"is the {thing} {colour}? Yes, the {thing} is {colour}.",
        f"is the {thing} {colour2}? No, it is {colour}.",
        f"{name} and {friend} {motion[2]} {prep} the {place}.",
        f"the {animal} is {adj} and {adj2}.",
        f"{friend} likes {colour}, {colour2} and {rng.choice(V.COLOURS)}.",
        f"there are {V.NUMBER_WORDS[n]} {plural(animal)} {prep} the {place}.",
        f"{V.NUMBER_WORDS[a]} and {V.NUMBER_WORDS[b]} make {V.NUMBER_WORDS[a + b]}.",
        f"{name} has {n} {plural(thing)} and {friend} has {a}.",
        f"the {thing} was {adj}, but the {animal} was {adj2}.",
        f"{friend} did not {verb[0]} the {animal} because it was {adj}.",
        f"then {name} {motion[2]} {prep} the {place} with the {animal}.",
    ]
    picked = rng.sample(sentences, rng.randint(2, 5))
    return " ".join(s[0].upper() + s[1:] for s in picked)


def _task_doc(rng: random.Random, split: str | None) -> str:
    """One task-format example whose prompt belongs to `split`."""
    while True:
        task = make_task(rng)
        prompt = format_prompt(task)
        if split is None or split_of(prompt) == split:
            break
    if rng.random() < CORRECT_ANSWER_FRACTION:
        response = task.answer
    elif FAMILIES[task.family].numeric:
        response = str(rng.randint(0, 2 * MAX_ADDEND))
    else:
        words = task.input.split()
        rng.shuffle(words)
        response = " ".join(words)
    return prompt + format_response(response)


def pretraining_corpus(seed: int, n_docs: int, split: str | None = None) -> list[str]:
    """`n_docs` documents from seed stream `seed` (restricted to `split` if given)."""
    rng = random.Random(f"pretrain/{seed}/{split}")
    docs: list[str] = []
    while len(docs) < n_docs:
        if rng.random() < TASK_DOC_FRACTION:
            docs.append(_task_doc(rng, split))
            continue
        doc = _story(rng)
        if split is None or split_of(doc) == split:
            docs.append(doc)
    return docs


def tokenizer_training_text(seed: int = 0, n_docs: int = 2000) -> list[str]:
    """Texts to train the BPE tokenizer on (a list: feed it to
    `train_from_iterator` as is, not joined into one string).

    Covers the corpus, every family's prompt and answer format, every word in
    lower, Capitalised and UPPER case, and the numbers 0-100 as digits.
    """
    rng = random.Random(f"tokenizer/{seed}")
    texts = pretraining_corpus(seed, n_docs, "train")  # held-out text stays unseen
    for name in FAMILIES:
        for _ in range(50):
            task = make_task(rng, (name,))
            texts.append(format_prompt(task) + format_response(task.answer))
    words = V.all_words()
    texts.append(" ".join(words))
    texts.append(" ".join(w.capitalize() for w in words))
    texts.append(" ".join(w.upper() for w in words))
    texts.append(" ".join(str(i) for i in range(101)))
    return texts
