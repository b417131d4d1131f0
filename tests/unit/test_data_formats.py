"""Record types: valid records build, every invalid case raises RecordError saying why."""
import dataclasses
import math

import pytest

from rlhf.data.formats import (Comparison, Demonstration, PromptRecord, RecordError, TextRecord,
                               record_from_dict)


def test_record_error_is_value_error():
    assert issubclass(RecordError, ValueError)


def test_valid_records_build_and_are_frozen():
    d = Demonstration(prompt="Say hi", response="hi")
    c = Comparison(prompt="p", responses=["a", "b", "c"], ranks=[1, 0, 2])
    assert c.responses == ("a", "b", "c") and c.ranks == (1, 0, 2)  # lists frozen into tuples
    assert PromptRecord(prompt="p").prompt == "p" and TextRecord(text="t").text == "t"
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.prompt = "other"
    assert hash(c) == hash(Comparison(prompt="p", responses=("a", "b", "c"), ranks=(1, 0, 2)))


def test_from_chosen_rejected_is_k2_with_ranks_0_1():
    c = Comparison.from_chosen_rejected("p", "good", "bad")
    assert (c.responses, c.ranks, c.soft_label, c.k) == (("good", "bad"), (0, 1), None, 2)


def test_duplicate_responses_and_ties_are_allowed():
    c = Comparison(prompt="p", responses=("same", "same", "other"), ranks=(0, 0, 1))
    assert c.k == 3


def test_pairs_hand_worked():
    # ranks (2, 0, 1, 0): 6 index pairs, (1, 3) tied; better index first.
    c = Comparison(prompt="p", responses=("a", "b", "c", "d"), ranks=(2, 0, 1, 0))
    assert c.pairs() == [(1, 0), (2, 0), (3, 0), (1, 2), (3, 2)]


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(prompt=None, response="r"), "'prompt' is missing"),
    (dict(prompt=3, response="r"), "'prompt' must be a string, got int"),
    (dict(prompt="p", response=""), "'response' is empty"),
    (dict(prompt="p", response=" \n\t"), "'response' is empty"),
])
def test_demonstration_invalid(kwargs, fragment):
    with pytest.raises(RecordError, match="Demonstration") as e:
        Demonstration(**kwargs)
    assert fragment in str(e.value)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(prompt="", responses=("a", "b"), ranks=(0, 1)), "'prompt' is empty"),
    (dict(prompt="p", responses=None, ranks=(0, 1)), "'responses' is missing"),
    (dict(prompt="p", responses="ab", ranks=(0, 1)), "'responses' must be a list, got str"),
    (dict(prompt="p", responses=("a",), ranks=(0,)), "K = 1 responses, need 2 <= K <= 9"),
    (dict(prompt="p", responses=tuple("abcdefghij"), ranks=tuple(range(10))), "K = 10 responses"),
    (dict(prompt="p", responses=("a", 5), ranks=(0, 1)), "'responses[1]' must be a string, got int"),
    (dict(prompt="p", responses=("a", " "), ranks=(0, 1)), "'responses[1]' is empty"),
    (dict(prompt="p", responses=("a", "b", "c"), ranks=(0, 1)), "2 ranks for 3 responses"),
    (dict(prompt="p", responses=("a", "b"), ranks=(0, 1.0)), "ranks[1] must be an int, got 1.0"),
    (dict(prompt="p", responses=("a", "b"), ranks=(True, 0)), "ranks[0] must be an int, got True"),
    (dict(prompt="p", responses=("a", "b"), ranks=(0, -1)), "ranks[1] = -1 is negative"),
    (dict(prompt="p", responses=("a", "b", "c"), ranks=(2, 2, 2)), "all 3 ranks are equal (2), no preference pair"),
    (dict(prompt="p", responses=("a", "b", "c"), ranks=(0, 1, 2), soft_label=0.7), "soft_label needs K = 2, got K = 3"),
    (dict(prompt="p", responses=("a", "b"), ranks=(0, 1), soft_label=1.2), "soft_label = 1.2 is not a probability"),
    (dict(prompt="p", responses=("a", "b"), ranks=(0, 1), soft_label=math.nan), "is not a probability"),
    (dict(prompt="p", responses=("a", "b"), ranks=(0, 1), soft_label="0.7"), "soft_label must be a number, got str"),
    (dict(prompt="p", responses=("a", "b"), ranks=(0, 1), soft_label=0.3), "contradicts ranks (0, 1)"),
    (dict(prompt="p", responses=("a", "b"), ranks=(1, 0), soft_label=0.8), "contradicts ranks (1, 0)"),
])
def test_comparison_invalid(kwargs, fragment):
    with pytest.raises(RecordError, match="Comparison") as e:
        Comparison(**kwargs)
    assert fragment in str(e.value)


def test_soft_label_consistent_with_ranks_is_kept_as_float():
    assert Comparison(prompt="p", responses=("a", "b"), ranks=(1, 0), soft_label=0).soft_label == 0.0
    assert Comparison(prompt="p", responses=("a", "b"), ranks=(0, 1), soft_label=0.5).soft_label == 0.5


@pytest.mark.parametrize("cls, field", [(PromptRecord, "prompt"), (TextRecord, "text")])
def test_single_field_records_invalid(cls, field):
    for value, fragment in [(None, "is missing"), (1.5, "must be a string, got float"), ("", "is empty")]:
        with pytest.raises(RecordError, match=cls.__name__) as e:
            cls(**{field: value})
        assert f"'{field}' {fragment}" in str(e.value)


def test_record_from_dict_both_comparison_layouts_and_extra_keys():
    ranked = record_from_dict("comparisons", {"prompt": "p", "responses": ["a", "b"], "ranks": [1, 0], "id": 7})
    paired = record_from_dict("comparisons", {"prompt": "p", "chosen": "b", "rejected": "a", "soft_label": 0.9})
    assert ranked == Comparison(prompt="p", responses=("a", "b"), ranks=(1, 0))
    assert paired == Comparison(prompt="p", responses=("b", "a"), ranks=(0, 1), soft_label=0.9)


def test_record_from_dict_tolerates_columnar_artifacts():
    # NaN (pandas) and None (Arrow) mean "missing"; integral float ranks (Arrow promotion) are ints.
    rec = record_from_dict("comparisons", {"prompt": "p", "responses": ["a", "b"], "ranks": [0.0, 1.0],
                                           "chosen": None, "rejected": math.nan})
    assert rec.ranks == (0, 1) and all(type(r) is int for r in rec.ranks)
    with pytest.raises(RecordError, match="'response' is missing"):
        record_from_dict("demonstrations", {"prompt": "p", "response": math.nan})


@pytest.mark.parametrize("kind, row, fragment", [
    ("comparisons", {"prompt": "p", "responses": ["a", "b"], "ranks": [0, 1], "chosen": "a", "rejected": "b"},
     "not both"),
    ("comparisons", {"prompt": "p"}, "needs fields 'responses' and 'ranks'"),
    ("comparisons", {"prompt": "p", "chosen": "a"}, "'rejected' is missing"),
    ("comparisons", {"prompt": "p", "responses": ["a", "b"], "ranks": [0, 1.5]}, "ranks[1] must be an int, got 1.5"),
    ("prompts", ["p"], "expected a JSON object, got list"),
])
def test_record_from_dict_invalid(kind, row, fragment):
    with pytest.raises(RecordError) as e:
        record_from_dict(kind, row)
    assert fragment in str(e.value)


def test_record_from_dict_unknown_kind():
    with pytest.raises(ValueError, match="unknown record kind 'pairs'"):
        record_from_dict("pairs", {"prompt": "p"})


@pytest.mark.parametrize("kind, rec", [
    ("demonstrations", Demonstration(prompt="p", response="r")),
    ("comparisons", Comparison(prompt="p", responses=("a", "b", "c"), ranks=(2, 0, 0))),
    ("comparisons", Comparison(prompt="p", responses=("a", "b"), ranks=(0, 1), soft_label=0.75)),
    ("prompts", PromptRecord(prompt="p")),
    ("text", TextRecord(text="t")),
])
def test_to_dict_round_trip(kind, rec):
    assert record_from_dict(kind, rec.to_dict()) == rec
