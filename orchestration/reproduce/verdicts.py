"""How a finding's numbers become a verdict: "reproduced", "not reproduced" or "inconclusive".

Every rule reads 95% intervals, never point estimates alone, so a verdict flips only
when the evidence does. `describe` gives the rule in words, which the report prints
beside it; tests recompute the verdict from the numbers in results.json.
"""
from __future__ import annotations

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"
VERDICTS = (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE)


def above(ci: tuple[float, float], threshold: float) -> str:
    """The claim: the quantity exceeds `threshold`."""
    lo, hi = ci
    return REPRODUCED if lo > threshold else NOT_REPRODUCED if hi < threshold else INCONCLUSIVE


def within(ci: tuple[float, float], margin: float) -> str:
    """The claim: the quantity is within +-margin of 0."""
    lo, hi = ci
    if -margin < lo and hi < margin:
        return REPRODUCED
    return NOT_REPRODUCED if lo >= margin or hi <= -margin else INCONCLUSIVE


def all_of(verdicts: list[str]) -> str:
    """Every part must hold: one part not reproduced sinks the claim; one open part leaves it open."""
    if NOT_REPRODUCED in verdicts:
        return NOT_REPRODUCED
    return REPRODUCED if all(v == REPRODUCED for v in verdicts) else INCONCLUSIVE


def sweep(verdicts: list[str]) -> str:
    """Parts: (claimed best setting - another setting) > 0, one per other setting.

    Not reproduced if some setting beats the claimed one; reproduced if none does and
    the claimed one beats at least one (a flat sweep tells nothing); else inconclusive.
    """
    if NOT_REPRODUCED in verdicts:
        return NOT_REPRODUCED
    return REPRODUCED if REPRODUCED in verdicts else INCONCLUSIVE


def any_of(verdicts: list[str]) -> str:
    """One part holding is enough; the claim fails only if every part fails."""
    if REPRODUCED in verdicts:
        return REPRODUCED
    return NOT_REPRODUCED if all(v == NOT_REPRODUCED for v in verdicts) else INCONCLUSIVE


# A rule is a tree: leaves test one measured interval, inner nodes combine them. It is
# stored as plain data in results.json beside the numbers it reads, so a reader (and
# the tests) can recompute every verdict.
def above_node(quantity: str, bound: float) -> dict:
    return {"test": "above", "quantity": quantity, "bound": bound}


def below_node(quantity: str, bound: float) -> dict:
    return {"test": "below", "quantity": quantity, "bound": bound}


def within_node(quantity: str, margin: float) -> dict:
    return {"test": "within", "quantity": quantity, "bound": margin}


def evaluate(rule: dict, measured: dict[str, dict]) -> str:
    """The verdict of `rule` on `measured` ({quantity: {"ci95": [lo, hi], ...}})."""
    if "test" in rule:
        lo, hi = measured[rule["quantity"]]["ci95"]
        if rule["test"] == "above":
            return above((lo, hi), rule["bound"])
        if rule["test"] == "below":
            return above((-hi, -lo), -rule["bound"])
        return within((lo, hi), rule["bound"])
    if "requires" in rule:  # a claim that cannot be tested unless its premise holds
        return evaluate(rule["then"], measured) if evaluate(rule["requires"], measured) == REPRODUCED else INCONCLUSIVE
    (kind, parts), = rule.items()
    verdicts = [evaluate(p, measured) for p in parts]
    if kind == "all_of":
        return all_of(verdicts)
    if kind == "any_of":
        return any_of(verdicts)
    if kind == "sweep":
        return sweep(verdicts)
    raise ValueError(f"unknown rule node {kind!r}")


def describe(rule: dict) -> str:
    """The rule in words, as the report prints it."""
    if "test" in rule:
        q, b = f"`{rule['quantity']}`", rule["bound"]
        if rule["test"] == "above":
            return f"{q}'s interval lies above {b:g} (below {b:g}: not reproduced)"
        if rule["test"] == "below":
            return f"{q}'s interval lies below {b:g} (above {b:g}: not reproduced)"
        return f"{q}'s interval lies within ±{b:g} (outside it: not reproduced)"
    if "requires" in rule:
        return f"if {describe(rule['requires'])} holds (else inconclusive): {describe(rule['then'])}"
    (kind, parts), = rule.items()
    inner = "; ".join(describe(p) for p in parts)
    return {"all_of": "all of: ", "any_of": "any of: ",
            "sweep": "no other setting significantly better, and at least one significantly worse: "}[kind] + inner
