"""Gold labeler scores and the noisy K-way ranking labeler."""
import functools
import random
import string

import pytest

from rlhf.synthetic.labeler import (clean_response, gold_score, labeler_accuracy, noiseless_ranks,
                                    rank_responses, ranks_from_scores, word_edit_distance)
from rlhf.synthetic.tasks import FAMILIES, Task, corrupt, make_task


def _reference_osa(a: tuple, b: tuple) -> int:
    """Unit-cost edit distance with adjacent swaps, written top-down (independent of the DP)."""
    @functools.lru_cache(maxsize=None)
    def d(i: int, j: int) -> int:
        if i == 0 or j == 0:
            return i + j
        best = min(d(i - 1, j) + 1, d(i, j - 1) + 1, d(i - 1, j - 1) + (a[i - 1] != b[j - 1]))
        if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
            best = min(best, d(i - 2, j - 2) + 1)
        return best
    return d(len(a), len(b))


def test_edit_distance_matches_reference_on_random_word_lists():
    rng = random.Random(0)
    for _ in range(500):
        a = tuple(rng.choice("abcd") for _ in range(rng.randint(0, 7)))
        b = tuple(rng.choice("abcd") for _ in range(rng.randint(0, 7)))
        assert word_edit_distance(a, b) == _reference_osa(a, b), (a, b)


def test_edit_distance_partial_costs_hand_worked():
    assert word_edit_distance(["FOX", "cup"], ["fox", "cup"]) == 0.5
    assert word_edit_distance(["8"], ["7"], numeric=True) == pytest.approx(0.55)
    assert word_edit_distance(["30"], ["7"], numeric=True) == 1.0
    assert word_edit_distance(["8"], ["7"], numeric=False) == 1.0
    assert word_edit_distance(["cup", "fox", "red"], ["fox", "cup", "red"]) == 1.0


def test_clean_response():
    assert clean_response(" cup fox <|endoftext|> junk after") == "cup fox"
    assert clean_response("\n  red </s>") == "red"
    assert clean_response("blue fox\n") == "blue fox"


def test_gold_score_hand_worked():
    task = Task("reverse", "reverse the words", "red fox cup blue", "blue cup fox red")
    assert gold_score(task, " blue cup fox red") == 1.0
    assert gold_score(task, " blue cup fox red<|endoftext|>") == 1.0
    assert gold_score(task, " blue cup red") == pytest.approx(1 - 1 / 4)       # one dropped word
    assert gold_score(task, " cup blue fox red") == pytest.approx(1 - 1 / 4)   # one swapped pair
    assert gold_score(task, " blue cup fox red red") == pytest.approx(1 - 1 / 5)
    assert gold_score(task, " BLUE cup fox red") == pytest.approx(1 - 0.5 / 4)
    assert gold_score(task, "") == 0.0
    add = Task("add", "add the numbers", "3 + 4", "7")
    assert gold_score(add, " 8") == pytest.approx(0.45)
    assert gold_score(add, " 70") == 0.0
    assert gold_score(add, " 7 7") == pytest.approx(0.5)


def test_correct_answer_beats_every_corruption_in_every_family():
    rng = random.Random(1)
    for name in FAMILIES:
        for _ in range(300):
            task = make_task(rng, (name,))
            assert gold_score(task, " " + task.answer) == 1.0
            for severity in (1, 2, 3):
                s = gold_score(task, " " + corrupt(task, rng, severity))
                assert 0.0 <= s < 1.0


def test_gibberish_scores_near_zero_and_all_scores_in_range():
    rng = random.Random(2)
    junk_scores = []
    for _ in range(2000):
        task = make_task(rng)
        junk = "".join(rng.choice(string.ascii_letters + string.punctuation + "  ")
                       for _ in range(rng.randint(0, 60)))
        s = gold_score(task, junk)
        assert 0.0 <= s <= 1.0
        junk_scores.append(s)
        long_tail = " " + task.answer + " " + " ".join(["dog"] * rng.randint(1, 30))
        assert 0.0 <= gold_score(task, long_tail) < 1.0
    assert max(junk_scores) <= 0.1 and sum(junk_scores) / len(junk_scores) < 0.01


def test_ranks_from_scores_share_ties():
    assert ranks_from_scores([0.2, 1.0, 0.5, 0.5]) == (3, 0, 1, 1)
    task = Task("copy", "copy the words", "owl red", "owl red")
    assert noiseless_ranks(task, [" red", " owl red", " zzz", " owl red"]) == (2, 0, 3, 0)


def _measured(agreement: float, n_prompts: int, seed: int) -> tuple[float, float, int]:
    """(accuracy vs gold, agreement of two independent labelers, pairs): an explicit
    loop over all pairs with distinct gold scores."""
    rng, first, second = random.Random(seed), random.Random(seed + 1), random.Random(seed + 2)
    right = agree = total = 0
    for _ in range(n_prompts):
        task = make_task(rng)
        k = rng.randint(4, 9)
        responses = [" " + task.answer] + [" " + corrupt(task, rng, rng.randint(1, 3))
                                           for _ in range(k - 1)]
        ranks = rank_responses(task, responses, first, agreement)
        other = rank_responses(task, responses, second, agreement)
        assert len(ranks) == k and all(0 <= r < k for r in ranks)
        gold = [gold_score(task, r) for r in responses]
        for i in range(k):
            for j in range(i + 1, k):
                if gold[i] != gold[j]:
                    total += 1
                    right += (gold[i] > gold[j]) == (ranks[i] < ranks[j])
                    agree += (ranks[i] < ranks[j]) == (other[i] < other[j])
    return right / total, agree / total, total


@pytest.mark.parametrize("agreement, accuracy", [(0.73, 0.839), (0.9, 0.947)])  # a^2 + (1-a)^2 by hand
def test_noisy_labelers_agree_with_each_other_as_set(agreement, accuracy):
    # Noise is drawn per prompt (pairs of one prompt are correlated), so we
    # need thousands of prompts, well beyond 10k pairs, to be within 2 points.
    assert labeler_accuracy(agreement) == pytest.approx(accuracy, abs=1e-3)
    right, agree, pairs = _measured(agreement, 6000, seed=11)
    assert pairs >= 10_000
    assert abs(agree - agreement) < 0.02
    assert abs(right - accuracy) < 0.02


def test_perfect_labeler_is_noiseless_and_range_is_checked():
    rng = random.Random(4)
    task = make_task(rng)
    responses = [" " + task.answer, " " + corrupt(task, rng), " nonsense", ""]
    for _ in range(20):
        assert rank_responses(task, responses, rng, 1.0) == noiseless_ranks(task, responses)
    for bad in (0.4, 1.1):
        with pytest.raises(ValueError):
            rank_responses(task, responses, rng, bad)
