"""The rules that turn a finding's intervals into "reproduced", "not reproduced" or "inconclusive"."""
import pytest

from orchestration.reproduce import verdicts as v

R, N, I = v.REPRODUCED, v.NOT_REPRODUCED, v.INCONCLUSIVE


def m(lo, hi):
    return {"value": (lo + hi) / 2, "ci95": [lo, hi]}


@pytest.mark.parametrize("ci, want", [((0.55, 0.62), R), ((0.41, 0.48), N), ((0.48, 0.56), I),
                                      ((0.5, 0.6), I)])  # touching the bound is not beyond it
def test_above(ci, want):
    assert v.above(ci, 0.5) == want
    assert v.evaluate(v.above_node("q", 0.5), {"q": m(*ci)}) == want


@pytest.mark.parametrize("ci, want", [((-0.02, 0.01), R), ((0.04, 0.06), N), ((-0.09, -0.031), N),
                                      ((0.01, 0.05), I)])
def test_within(ci, want):
    assert v.evaluate(v.within_node("q", 0.03), {"q": m(*ci)}) == want


def test_below_mirrors_above():
    assert v.evaluate(v.below_node("q", 0.03), {"q": m(-0.01, 0.02)}) == R
    assert v.evaluate(v.below_node("q", 0.03), {"q": m(0.04, 0.05)}) == N
    assert v.evaluate(v.below_node("q", 0.03), {"q": m(0.0, 0.05)}) == I


def test_combinations():
    meas = {"good": m(0.6, 0.7), "bad": m(0.1, 0.2), "open": m(0.4, 0.6)}
    up = {k: v.above_node(k, 0.5) for k in meas}
    assert v.evaluate({"all_of": [up["good"], up["open"]]}, meas) == I
    assert v.evaluate({"all_of": [up["good"], up["bad"], up["open"]]}, meas) == N
    assert v.evaluate({"any_of": [up["bad"], up["open"]]}, meas) == I
    assert v.evaluate({"any_of": [up["bad"], up["good"]]}, meas) == R
    assert v.evaluate({"any_of": [up["bad"], up["bad"]]}, meas) == N
    # a premise that fails makes the claim untestable, never refuted
    assert v.evaluate({"requires": up["bad"], "then": up["good"]}, meas) == I
    assert v.evaluate({"requires": up["good"], "then": up["bad"]}, meas) == N


def test_sweep_needs_one_clear_win_and_no_loss():
    diffs = {"flat": m(-0.01, 0.01), "win": m(0.02, 0.05), "loss": m(-0.05, -0.01)}
    node = lambda *ks: {"sweep": [v.above_node(k, 0.0) for k in ks]}  # noqa: E731
    assert v.evaluate(node("flat", "win"), diffs) == R
    assert v.evaluate(node("flat", "flat"), diffs) == I
    assert v.evaluate(node("win", "loss"), diffs) == N


def test_describe_names_every_quantity():
    rule = {"requires": v.above_node("premise", 0.5),
            "then": {"all_of": [v.below_node("a", 0.0), v.within_node("b", 0.03)]}}
    text = v.describe(rule)
    for q in ("`premise`", "`a`", "`b`", "0.5", "0.03"):
        assert q in text
    with pytest.raises(ValueError, match="unknown"):
        v.evaluate({"most_of": []}, {})
