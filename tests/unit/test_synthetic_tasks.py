"""Task families, prompt format, mistakes, split ownership, and the corpus."""
import random
import re

import pytest

from rlhf.synthetic import vocab
from rlhf.synthetic.corpus import plural, pretraining_corpus, tokenizer_training_text
from rlhf.synthetic.tasks import (FAMILIES, Task, corrupt, format_prompt, format_response,
                                  make_task, parse_prompt, split_of)

ALL_WORDS = set(vocab.all_words())


@pytest.mark.parametrize("family,text,answer", [
    ("reverse", "red fox cup", "cup fox red"),
    ("sort", "fox cup red ant", "ant cup fox red"),
    ("copy", "owl blue", "owl blue"),
    ("uppercase", "red fox", "RED FOX"),
    ("count", "cat cat dog", "3"),
    ("add", "7 + 15", "22"),
    ("first", "pig hat bee", "pig"),
    ("last", "pig hat bee", "bee"),
])
def test_family_answers_hand_worked(family, text, answer):
    assert FAMILIES[family].solve(text) == answer
    prompt = f"Instruction: {FAMILIES[family].instruction}\nInput: {text}\nResponse:"
    assert parse_prompt(prompt) == Task(family, FAMILIES[family].instruction, text, answer)


def test_format_is_the_documented_template():
    task = Task("reverse", "reverse the words", "red fox blue", "blue fox red")
    assert format_prompt(task) == "Instruction: reverse the words\nInput: red fox blue\nResponse:"
    assert format_response(task.answer) == " blue fox red"


def test_make_task_is_deterministic_per_seed():
    def draw(seed):
        rng = random.Random(seed)
        return [make_task(rng) for _ in range(50)]
    assert draw(1) == draw(1)
    assert draw(1) != draw(2)


def test_random_tasks_are_short_well_formed_and_round_trip():
    rng = random.Random(0)
    for name, family in FAMILIES.items():
        for _ in range(200):
            task = make_task(rng, (name,))
            assert task.family == name
            assert parse_prompt(format_prompt(task)) == task
            words = task.input.split()
            assert len(task.answer.split()) <= 12 and len(format_prompt(task).split()) <= 20
            if name == "sort":
                # A permutation of the input in non-decreasing order, checked pairwise.
                ans = task.answer.split()
                assert sorted(ans) == sorted(words)
                assert all(a <= b for a, b in zip(ans, ans[1:]))
            elif name == "reverse":
                assert [words[len(words) - 1 - i] for i in range(len(words))] == task.answer.split()
            elif name == "count":
                assert int(task.answer) == task.input.count(" ") + 1
            elif name == "add":
                a, b = re.fullmatch(r"(\d+) \+ (\d+)", task.input).groups()
                assert int(task.answer) == int(a) + int(b)
            elif name == "uppercase":
                assert task.answer == "".join(chr(ord(c) - 32) if "a" <= c <= "z" else c
                                              for c in task.input)
            if not family.numeric:
                assert set(words) <= ALL_WORDS


def test_make_task_respects_family_subset():
    rng = random.Random(3)
    fams = {make_task(rng, ("add", "copy")).family for _ in range(100)}
    assert fams == {"add", "copy"}


def test_parse_prompt_rejects_other_text():
    for bad in ("hello", "Instruction: fly away\nInput: a\nResponse:",
                "Instruction: add the numbers\nInput: two + x\nResponse:"):
        with pytest.raises(ValueError):
            parse_prompt(bad)


def test_corruptions_are_wrong_but_plausible():
    rng = random.Random(5)
    for name, family in FAMILIES.items():
        for severity in (1, 2, 3):
            for _ in range(150):
                task = make_task(rng, (name,))
                wrong = corrupt(task, rng, severity)
                assert wrong != task.answer and wrong.strip() == wrong and wrong
                for w in wrong.split():  # vocabulary words or numbers, never junk
                    assert w.lower() in ALL_WORDS or w.isdigit(), (name, wrong)
                assert abs(len(wrong.split()) - len(task.answer.split())) <= 3 + severity


def test_split_of_is_stable_and_roughly_80_10_10():
    rng = random.Random(0)
    prompts = {format_prompt(make_task(rng)) for _ in range(5000)}
    splits = [split_of(p) for p in prompts]
    assert splits == [split_of(p) for p in prompts]
    frac = {s: splits.count(s) / len(splits) for s in ("train", "valid", "test")}
    assert abs(frac["train"] - 0.8) < 0.03 and abs(frac["valid"] - 0.1) < 0.03
    assert abs(frac["test"] - 0.1) < 0.03


def test_plural():
    assert [plural(w) for w in ("cup", "box", "brush", "mouse", "sheep")] == \
        ["cups", "boxes", "brushes", "mice", "sheep"]


def test_corpus_is_deterministic_and_split_owned():
    assert pretraining_corpus(0, 200) == pretraining_corpus(0, 200)
    assert pretraining_corpus(0, 200) != pretraining_corpus(1, 200)
    by_split = {s: pretraining_corpus(0, 300, s) for s in ("train", "valid", "test")}
    assert all(len(d) == 300 for d in by_split.values())
    assert not set(by_split["train"]) & set(by_split["test"])
    assert not set(by_split["train"]) & set(by_split["valid"])
    for split, docs in by_split.items():
        for doc in docs:
            if doc.startswith("Instruction:"):  # task documents: the prompt is owned
                prompt = doc[:doc.index("Response:") + len("Response:")]
                assert split_of(prompt) == split
                parse_prompt(prompt)
            else:
                assert split_of(doc) == split


def test_corpus_mixes_prose_and_some_task_documents():
    docs = pretraining_corpus(0, 2000)
    task_docs = [d for d in docs if d.startswith("Instruction:")]
    assert 0.15 < len(task_docs) / len(docs) < 0.25
    correct = 0
    for doc in task_docs:
        prompt, response = doc.split("Response:")
        correct += response == format_response(parse_prompt(prompt + "Response:").answer)
    # ~10% correct by design, plus shuffles that happen to land on the answer.
    assert 0.05 < correct / len(task_docs) < 0.35
    prose_words = {w.strip(".,?").lower() for d in docs if d not in task_docs for w in d.split()}
    assert len(prose_words) > 150


def test_tokenizer_text_covers_corpus_and_formats():
    texts = tokenizer_training_text(0, n_docs=300)
    assert isinstance(texts, list) and all(isinstance(t, str) for t in texts)
    joined = "\n".join(texts)
    for word in vocab.all_words():
        for form in (word, word.capitalize(), word.upper()):
            assert form in joined
    for family in FAMILIES.values():
        assert f"Instruction: {family.instruction}\nInput: " in joined
    chars = set("".join(pretraining_corpus(7, 500)))
    assert chars <= set(joined)
