"""SyntheticSuite: determinism, split disjointness, demo noise, comparisons."""
import itertools

import pytest

from rlhf.data.formats import Comparison, Demonstration, PromptRecord, TextRecord
from rlhf.synthetic import vocab
from rlhf.synthetic.labeler import gold_score, noiseless_ranks
from rlhf.synthetic.suite import RUN_ON_WORDS, SyntheticSuite
from rlhf.synthetic.tasks import FAMILIES, format_response, parse_prompt

SPLITS = ("train", "valid", "test")
ALL_WORDS = set(vocab.all_words())


def _all_data(suite: SyntheticSuite, split: str) -> tuple:
    return (suite.prompts(split, 30), suite.demonstrations(split, 30),
            suite.comparisons(split, 30), suite.pretraining_text(split, 30))


def test_same_seed_same_data_different_seed_different_data():
    for split in SPLITS:
        a, b, c = (_all_data(SyntheticSuite(seed=s), split) for s in (0, 0, 1))
        assert a == b
        for x, z in zip(a, c):
            assert x != z


def test_purposes_use_separate_streams():
    suite = SyntheticSuite()
    prompts = [p for _, p in suite.prompts("train", 50)]
    assert prompts != [d.prompt for d in suite.demonstrations("train", 50)]
    # Changing the noise level changes responses, not which prompts are drawn.
    noisy = SyntheticSuite(demo_noise=0.9).demonstrations("train", 50)
    assert [d.prompt for d in noisy] == [d.prompt for d in suite.demonstrations("train", 50)]


def test_splits_are_disjoint_for_every_kind_of_data():
    suite = SyntheticSuite(seed=3)
    seen: dict[str, set[str]] = {}
    for split in SPLITS:
        texts = {p for _, p in suite.prompts(split, 600)}
        texts |= {d.prompt for d in suite.demonstrations(split, 600)}
        texts |= {c.prompt for c in suite.comparisons(split, 300)}
        docs = [r.text for r in suite.pretraining_text(split, 600)]
        # Task documents of the corpus count by their prompt.
        texts |= {d[:d.index("Response:") + 9] if d.startswith("Instruction:") else d for d in docs}
        seen[split] = texts
    for a, b in itertools.combinations(SPLITS, 2):
        assert not seen[a] & seen[b], (a, b)


def test_prompts_and_records():
    suite = SyntheticSuite(families=("sort", "add"))
    pairs = suite.prompts("valid", 100)
    assert len(pairs) == 100 and {t.family for t, _ in pairs} == {"sort", "add"}
    for task, prompt in pairs:
        assert parse_prompt(prompt) == task
    records = suite.prompt_records("valid", 100)
    assert records == [PromptRecord(prompt=p) for _, p in pairs]
    assert all(isinstance(r, TextRecord) for r in suite.pretraining_text("test", 10))


@pytest.mark.parametrize("noise", [0.3, 0.1])
def test_demo_noise_rate_matches_setting(noise):
    demos = SyntheticSuite(seed=2, demo_noise=noise).demonstrations("train", 8000)
    assert all(isinstance(d, Demonstration) for d in demos)
    wrong = 0
    for d in demos:
        task = parse_prompt(d.prompt)
        if d.response != format_response(task.answer):
            wrong += 1
            assert d.response.startswith(" ") and gold_score(task, d.response) < 1.0
            # A plausible mistake, not gibberish: vocabulary words and numbers only.
            assert all(w.lower() in ALL_WORDS or w.isdigit() for w in d.response.split())
    assert abs(wrong / len(demos) - noise) < 0.02


def test_demo_noise_extremes():
    clean = SyntheticSuite(demo_noise=0.0).demonstrations("test", 300)
    assert all(d.response == format_response(parse_prompt(d.prompt).answer) for d in clean)
    broken = SyntheticSuite(demo_noise=1.0).demonstrations("test", 300)
    assert all(d.response != format_response(parse_prompt(d.prompt).answer) for d in broken)


def test_comparisons_have_k_in_range_and_valid_ranks():
    comps = SyntheticSuite(seed=4).comparisons("train", 600, k_min=4, k_max=9)
    assert len(comps) == 600 and all(isinstance(c, Comparison) for c in comps)
    assert {len(c.responses) for c in comps} == set(range(4, 10))
    with_answer = 0
    for c in comps:
        k = len(c.responses)
        assert len(c.ranks) == k and all(0 <= r < k for r in c.ranks) and len(set(c.ranks)) > 1
        task = parse_prompt(c.prompt)
        with_answer += format_response(task.answer) in c.responses
    assert 0.4 < with_answer / len(comps) < 0.7


def test_run_ons_appear_only_when_asked_and_rank_below_the_answer():
    suite = SyntheticSuite(seed=3, labeler_agreement=1.0)
    plain = suite.comparisons("train", 300)
    assert plain == suite.comparisons("train", 300, run_on_prob=0.0)  # the default is no run-ons
    assert all(len(r.split()) < RUN_ON_WORDS[0] for c in plain for r in c.responses)
    mixed = suite.comparisons("train", 300, run_on_prob=0.3)
    others = run_ons = 0
    for c in mixed:
        task = parse_prompt(c.prompt)
        answer = format_response(task.answer)
        for i, r in enumerate(c.responses):
            if r == answer:
                continue
            others += 1
            if len(r.split()) >= RUN_ON_WORDS[0]:
                run_ons += 1
                assert len(r.split()) <= RUN_ON_WORDS[1] and gold_score(task, r) < 0.25
                if answer in c.responses:
                    assert c.ranks[c.responses.index(answer)] < c.ranks[i]
    assert 0.25 < run_ons / others < 0.35
    with pytest.raises(ValueError, match="run_on_prob"):
        suite.comparisons("train", 3, run_on_prob=0.95)


def test_perfect_labeler_comparisons_follow_gold_scores():
    suite = SyntheticSuite(labeler_agreement=1.0)
    for c in suite.comparisons("valid", 300, k_min=2, k_max=5):
        task = parse_prompt(c.prompt)
        assert c.ranks == noiseless_ranks(task, c.responses)
        scores = [gold_score(task, r) for r in c.responses]
        for i, j in itertools.combinations(range(len(scores)), 2):
            if scores[i] > scores[j]:
                assert c.ranks[i] < c.ranks[j]


def test_comparisons_from_a_sampler_keep_its_order_and_drop_empties():
    calls = []

    def sampler(prompts):
        calls.append(list(prompts))
        # Response i: a number that identifies its position; every 5th is empty.
        return ["" if i % 5 == 4 else f" {i}" for i in range(len(prompts))]

    suite = SyntheticSuite(labeler_agreement=1.0, families=("add",))
    comps = suite.comparisons("train", 40, k_min=4, k_max=6, sampler=sampler)
    (flat,) = calls
    assert 40 * 4 <= len(flat) <= 40 * 6
    last = -1
    for comp in comps:
        # Responses come from consecutive sampler outputs for this very prompt,
        # in order, less the empty ones.
        idx = [int(r) for r in comp.responses]
        assert all(flat[i] == comp.prompt for i in idx) and idx[0] > last
        assert idx == [i for i in range(idx[0], idx[-1] + 1) if i % 5 != 4]
        assert 2 <= len(idx) <= 6
        last = idx[-1]
    assert 0 < len(comps) <= 40

    def short(prompts):
        return [" 1"] * (len(prompts) - 1)
    with pytest.raises(ValueError):
        suite.comparisons("train", 5, sampler=short)


def test_score_accepts_prompt_text_or_task():
    suite = SyntheticSuite()
    for task, prompt in suite.prompts("test", 100):
        good, bad = format_response(task.answer), " zebra zebra"
        assert suite.score(prompt, good) == suite.score(task, good) == 1.0
        assert suite.score(prompt, bad) == gold_score(task, bad) < 1.0
        assert suite.parse_prompt(prompt) == task


def test_bad_settings_are_rejected():
    for kwargs in ({"labeler_agreement": 0.3}, {"demo_noise": 1.5}, {"families": ("fly",)}):
        with pytest.raises(ValueError):
            SyntheticSuite(**kwargs)
    suite = SyntheticSuite()
    with pytest.raises(ValueError):
        suite.prompts("dev", 3)
    with pytest.raises(ValueError):
        suite.comparisons("train", 3, k_min=5, k_max=10)
    assert set(SyntheticSuite().families) == set(FAMILIES)
