"""The paper's findings, one experiment each: the runs it needs and the findings it measures.

Every finding holds the paper's claim, the figures measured (mean and 95% interval
over seeds and prompts, or text blocks), the rule that turns them into a verdict
(`verdicts.evaluate`) and the series its plot draws. Settings are relative to the
config (the tiny preset by default): the sweeps are the paper's values, the batch
sizes halve the config's, the large KL coefficient is 100x the config's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from orchestration.reproduce import verdicts as v
from orchestration.reproduce.measures import (best_of_n, best_of_n_kl, differences, draw_scored, parameters,
                                              rm_against_labelers, same_prompts, sample_gold, wins)
from orchestration.reproduce.runs import SFT_ONLY, RunSpec, seed_run
from orchestration.reproduce.study import Study, figure
from orchestration.rundir import StageDir, read_metrics
from rlhf.seeds import derive_seed

SFT, PPO, PTX = "SFT", "PPO", "PPO-ptx"
# The sweeps (the config's own value joins each); --quick keeps one point besides it.
PTX_SWEEP, QUICK_PTX_SWEEP = (0.0, 1.0, 10.0, 27.8), (0.0,)   # Appendix E.6's sweep
KL_SWEEP, QUICK_KL_SWEEP = (0.0, 0.02, 0.1, 0.5), (0.02,)     # around the paper's 0.02
PAPER_KL = 0.02
GOLD_COST = 0.03                           # "little cost": at most this much gold score for ptx
AGREEMENT_MARGIN = 0.03                    # RM accuracy "about" inter-labeler agreement: within 3 points


@dataclass(frozen=True)
class Experiment:
    name: str
    title: str
    needs: Callable[[Study], list[RunSpec]]
    measure: Callable[[Study], list[dict]]


def finding(name: str, claim: str, paper: str, measured: dict[str, dict], rule: dict, runs: list[str],
            **extra) -> dict:
    return {"name": name, "claim": claim, "paper": paper, "measured": measured, "rule": rule,
            "rule_text": v.describe(rule), "verdict": v.evaluate(rule, measured), "runs": runs, **extra}


def _fmt(x: float) -> str:
    return f"{x:g}"


# --- 1. Preference over SFT (Figure 1) ---

def preference(st: Study) -> list[dict]:
    measured = {f"win {p} vs SFT": figure(st.per_seed(lambda e, p=p: wins(e.gold[p], e.gold[SFT], e.repeats)))
                for p in (PPO, PTX)}
    measured |= {f"gold {p}": figure(st.per_seed(lambda e, p=p: e.per_prompt(e.gold[p]))) for p in (SFT, PPO, PTX)}
    rule = {"all_of": [v.above_node(f"win {p} vs SFT", 0.5) for p in (PPO, PTX)]}
    return [finding("preference", "Labelers prefer PPO and PPO-ptx outputs to the SFT model's.",
                    "Figure 1, Section 4.1 (175B PPO-ptx preferred to 175B SFT about 70% of the time)",
                    measured, rule, [r.name for r in st.seed_runs()])]


# --- 2. A small aligned model beats a larger SFT model ---

def large_sft(st: Study) -> RunSpec:
    t = st.base.model.tiny
    return RunSpec("sft_large", st.seeds[0], (f"model.tiny.n_layer={2 * t.n_layer}",
                                              f"model.tiny.n_embd={t.n_embd * 3 // 2}"), SFT_ONLY)


def small_beats_large(st: Study) -> list[dict]:
    base, large = seed_run(st.seeds[0]).name, large_sft(st).name
    e = st.eval(base)
    large_dir = StageDir(st.runs.dir(large), "sft").final
    large_gold = sample_gold(large_dir, e.prompts, st.base.model.max_response_tokens,
                             seed=derive_seed(st.seeds[0], "reproduce", "sft_large"))
    seed = st.seeds[0]
    measured = {"win PPO-ptx vs large SFT": figure({seed: wins(e.gold[PTX], large_gold, e.repeats)}),
                "win large SFT vs SFT": figure({seed: wins(large_gold, e.gold[SFT], e.repeats)}),
                "gold large SFT": figure({seed: e.per_prompt(large_gold)})}
    small, big = parameters(StageDir(st.runs.dir(base), "sft").final), parameters(large_dir)
    rule = {"requires": v.above_node("win large SFT vs SFT", 0.5),
            "then": v.above_node("win PPO-ptx vs large SFT", 0.5)}
    return [finding("small_beats_large", "A small PPO-ptx model is preferred to an SFT model with several "
                    "times its parameters, trained on the same demonstrations.",
                    "Section 4.1 (1.3B PPO-ptx preferred to 175B SFT)", measured, rule, [base, large],
                    parameters={"policy": small, "large_sft": big, "ratio": big / small})]


# --- 3. ptx fixes the regressions; a larger KL coefficient alone does not ---

def _ptx_coefs(st: Study) -> list[float]:
    return sorted({*(QUICK_PTX_SWEEP if st.quick else PTX_SWEEP), st.base.ppo.ptx_coef})


def _ptx_variant(st: Study, coef: float) -> RunSpec:
    return st.variant(f"ptx{_fmt(coef)}", f"ppo.ptx_coef={coef}")


def _ptx_run(st: Study, coef: float) -> tuple[str, str]:
    """(run, policy) of PPO with ptx coefficient `coef` on the first seed's stages."""
    if coef == 0:
        return seed_run(st.seeds[0]).name, PPO
    if coef == st.base.ppo.ptx_coef:
        return seed_run(st.seeds[0]).name, PTX
    return _ptx_variant(st, coef).name, PTX


def _big_kl(st: Study) -> RunSpec:
    return st.variant("kl_x100", f"ppo.kl_coef={100 * st.base.ppo.kl_coef}", "ppo.ptx_coef=0")


def ptx_needs(st: Study) -> list[RunSpec]:
    return [*st.seed_runs(), *(_ptx_variant(st, c) for c in _ptx_coefs(st) if c not in (0, st.base.ppo.ptx_coef)),
            _big_kl(st)]


def ptx(st: Study) -> list[dict]:
    if st.base.ppo.ptx_coef <= 0:
        raise ValueError("reproduce: ptx needs ppo.ptx_coef > 0 in the config (PPO-ptx against PPO)")

    def blocks(e, a, b, half=None):
        d = differences(e.blocks[a], e.blocks[b])
        return d if half is None else [x - 0.5 * y for x, y in zip(d, differences(e.blocks[half], e.blocks[b]))]

    measured = {
        "LM loss PPO - SFT": figure(st.per_seed(lambda e: blocks(e, PPO, SFT))),
        "LM loss PPO-ptx - SFT - half of PPO's rise": figure(st.per_seed(lambda e: blocks(e, PTX, SFT, half=PPO))),
        "gold PPO - PPO-ptx": figure(st.per_seed(lambda e: e.per_prompt(differences(e.gold[PPO], e.gold[PTX])))),
        "LM loss PPO-ptx - PPO": figure(st.per_seed(lambda e: blocks(e, PTX, PPO))),
    }
    rule = {"requires": v.above_node("LM loss PPO - SFT", 0.0),
            "then": {"all_of": [v.below_node("LM loss PPO-ptx - SFT - half of PPO's rise", 0.0),
                                v.below_node("gold PPO - PPO-ptx", GOLD_COST)]}}
    seed, base = st.seeds[0], seed_run(st.seeds[0]).name
    sft_eval = st.eval(base)
    sweep = []
    for coef in _ptx_coefs(st):
        run, policy = _ptx_run(st, coef)
        e = st.eval(run)
        same_prompts(sft_eval, e)
        sweep.append({"ptx_coef": coef, "run": run,
                      "LM loss vs SFT": figure({seed: differences(e.blocks[policy], sft_eval.blocks[SFT])}),
                      "gold": figure({seed: e.per_prompt(e.gold[policy])}),
                      "KL": e.results["policies"][policy]["kl_to_sft"]})
    first = finding("ptx_fixes_regressions", "Mixing pretraining gradients into PPO (PPO-ptx) removes most of "
                    "the rise in pretraining LM loss that PPO causes, at little cost to the labelers' preference.",
                    "Section 4.2, Appendix E.6 (Figures 33-34)", measured, rule,
                    [r.name for r in st.seed_runs()] + [s["run"] for s in sweep], sweep=sweep)

    big = _big_kl(st).name
    kl_eval = st.eval(big)
    same_prompts(sft_eval, kl_eval)
    measured_kl = {
        "LM loss large-KL PPO - PPO-ptx": figure({seed: differences(kl_eval.blocks[PPO], sft_eval.blocks[PTX])}),
        "gold PPO-ptx - large-KL PPO": figure({seed: sft_eval.per_prompt(
            differences(sft_eval.gold[PTX], kl_eval.gold[PPO]))}),
        "LM loss large-KL PPO - SFT": figure({seed: differences(kl_eval.blocks[PPO], sft_eval.blocks[SFT])}),
        "KL large-KL PPO": {"value": kl_eval.results["policies"][PPO]["kl_to_sft"],
                            "ci95": kl_eval.results["policies"][PPO]["kl_to_sft_ci"], "seeds": [seed]},
    }
    rule_kl = {"any_of": [v.above_node("LM loss large-KL PPO - PPO-ptx", 0.0),
                          v.above_node("gold PPO-ptx - large-KL PPO", 0.0)]}
    second = finding("larger_kl_does_not_fix", f"A 100x larger KL coefficient (here "
                     f"{_fmt(100 * st.base.ppo.kl_coef)}) without ptx does not match PPO-ptx: it leaves a higher "
                     "LM loss or a lower preference.", "Section 4.2, Appendix E.6 (Figure 34)",
                     measured_kl, rule_kl, [base, big])
    return [first, second]


# --- 4. RM accuracy against inter-labeler agreement ---

def rm_vs_labelers(st: Study) -> list[dict]:
    n = 200 if st.quick else 2000
    per = {s: rm_against_labelers(st.runs.config_of(seed_run(s)), n_prompts=n) for s in st.seeds}

    def accuracy(res, key):
        return [r / p for r, p in res[key]["per_prompt"]]

    measured = {"RM accuracy": figure({s: accuracy(r, "rm") for s, r in per.items()}),
                "inter-labeler agreement": figure({s: accuracy(r, "inter_labeler") for s, r in per.items()}),
                "RM - inter-labeler": figure({s: differences(accuracy(r, "rm"), accuracy(r, "inter_labeler"))
                                              for s, r in per.items()}),
                "gold ranking vs labelers": figure({s: accuracy(r, "gold_labeler") for s, r in per.items()})}
    rule = v.within_node("RM - inter-labeler", AGREEMENT_MARGIN)
    return [finding("rm_vs_labelers", "The RM predicts held-out labelers' rankings about as often as labelers "
                    "agree with each other.", "Section 4.1 / Appendix E.2 (72.4% vs 72.6%)", measured, rule,
                    [r.name for r in st.seed_runs()], prompts_per_seed=per[st.seeds[0]]["prompts"])]


# --- 5. The KL coefficient ---

def _kl_coefs(st: Study) -> list[float]:
    return sorted({*(QUICK_KL_SWEEP if st.quick else KL_SWEEP), st.base.ppo.kl_coef})


def _kl_variant(st: Study, beta: float) -> RunSpec:
    return st.variant(f"kl{_fmt(beta)}", f"ppo.kl_coef={beta}", "ppo.ptx_coef=0")


def _kl_run(st: Study, beta: float) -> str:
    return seed_run(st.seeds[0]).name if beta == st.base.ppo.kl_coef else _kl_variant(st, beta).name


def kl_needs(st: Study) -> list[RunSpec]:
    return [seed_run(st.seeds[0]), *(_kl_variant(st, b) for b in _kl_coefs(st) if b != st.base.ppo.kl_coef)]


def _kl_points(st: Study) -> list[dict]:
    """Plain PPO at each KL coefficient: its run, measured KL, per-prompt gold and RM score."""
    ref = st.eval(seed_run(st.seeds[0]).name)
    points = []
    for beta in _kl_coefs(st):
        e = st.eval(_kl_run(st, beta))
        same_prompts(ref, e)
        points.append({"beta": beta, "run": _kl_run(st, beta), "kl": e.results["policies"][PPO]["kl_to_sft"],
                       "gold": e.per_prompt(e.gold[PPO]), "rm": e.per_prompt(e.rm[PPO])})
    return points


def kl_coef(st: Study) -> list[dict]:
    seed, points = st.seeds[0], _kl_points(st)
    paper = next(p for p in points if p["beta"] == PAPER_KL)
    measured = {f"gold beta={_fmt(p['beta'])}": figure({seed: p["gold"]}) for p in points}
    for p in points:
        if p is not paper:
            measured[f"gold beta=0.02 - beta={_fmt(p['beta'])}"] = figure({seed: differences(paper["gold"], p["gold"])})
    rule = {"sweep": [v.above_node(k, 0.0) for k in measured if " - " in k]}
    series = [{"beta": p["beta"], "run": p["run"], "kl": p["kl"], "gold": measured[f"gold beta={_fmt(p['beta'])}"]}
              for p in points]
    return [finding("kl_coef", "A KL coefficient of 0.01-0.02 works best (plain PPO, gold score at equal episodes).",
                    "Appendix C.4 (beta = 0.02)", measured, rule, [p["run"] for p in points], sweep=series)]


# --- 6. Batch sizes ---

def _batch_runs(st: Study) -> tuple[RunSpec, RunSpec]:
    b, m = st.base.ppo.batch_size, st.base.ppo.minibatch_size
    return (st.variant(f"batch{b // 2}", f"ppo.batch_size={b // 2}", "ppo.ptx_coef=0"),
            st.variant(f"minibatch{m // 2}", f"ppo.minibatch_size={m // 2}", "ppo.ptx_coef=0"))


def batch_sizes(st: Study) -> list[dict]:
    seed, base = st.seeds[0], seed_run(st.seeds[0]).name
    b, m = st.base.ppo.batch_size, st.base.ppo.minibatch_size
    half_batch, half_mini = (st.eval(r.name) for r in _batch_runs(st))
    ref = st.eval(base)
    same_prompts(ref, half_batch, half_mini)
    gold = {name: ref.per_prompt(e.gold[PPO]) for name, e in
            ((f"batch {b}, minibatch {m}", ref), (f"batch {b // 2}, minibatch {m}", half_batch),
             (f"batch {b}, minibatch {m // 2}", half_mini))}
    keys = list(gold)
    out = []
    for name, better, worse, claim, paper in (
            ("batch_size", keys[0], keys[1], f"A larger batch ({b}) beats a smaller one ({b // 2}) at equal episodes.",
             "Appendix C.4 (batch 512 best; ours halves the paper's sizes)"),
            ("minibatch_size", keys[2], keys[0], f"A smaller minibatch ({m // 2}) is slightly better than {m}.",
             "Appendix C.4 (minibatch 32 slightly better than 64)")):
        diff = f"gold {better} - {worse}"
        measured = {f"gold {k}": figure({seed: gold[k]}) for k in (better, worse)}
        measured[diff] = figure({seed: differences(gold[better], gold[worse])})
        out.append(finding(name, claim, paper, measured, v.above_node(diff, 0.0),
                           [base, *(r.name for r in _batch_runs(st))]))
    return out


# --- 7. Reward over-optimisation ---

def _peak_drop(curve: list[dict], key: str) -> tuple[int, list[float], list[float]]:
    """The peak of `key` chosen on even prompts; on odd prompts, its drop to the curve's end and the
    RM score's gain over the same span (choosing and testing on one half would flatter the drop)."""
    means = [sum(p[key][0::2]) / len(p[key][0::2]) for p in curve]
    i = max(range(len(curve)), key=means.__getitem__)
    peak, end = curve[i], curve[-1]
    return i, differences(peak[key][1::2], end[key][1::2]), differences(end["rm"][1::2], peak["rm"][1::2])


def over_optimisation(st: Study) -> list[dict]:
    seed, base = st.seeds[0], seed_run(st.seeds[0]).name
    ref = st.eval(base)
    k = 8 if st.quick else 64
    groups = draw_scored(StageDir(st.runs.dir(base), "sft").final, StageDir(st.runs.dir(base), "rm").final,
                         ref.unique_prompts(), k, st.base.model.max_response_tokens,
                         seed=derive_seed(seed, "reproduce", "best-of-n"))
    bon = []
    n = 1
    while n <= k:
        gold, rm = best_of_n(groups, n)
        bon.append({"n": n, "kl": best_of_n_kl(n), "gold": gold, "rm": rm})
        n *= 2
    ppo = sorted(_kl_points(st), key=lambda p: p["kl"])
    measured = {}
    curves = {}
    for name, curve in (("best-of-n", bon), ("PPO", ppo)):
        i, drop, gain = _peak_drop(curve, "gold")
        measured[f"{name}: gold drop from peak to largest KL"] = figure({seed: drop})
        measured[f"{name}: RM gain from gold's peak to largest KL"] = figure({seed: gain})
        curves[name] = [{**{x: p[x] for x in p if x not in ("gold", "rm")},
                         "gold": sum(p["gold"]) / len(p["gold"]), "rm": sum(p["rm"]) / len(p["rm"]),
                         "gold_peak": j == i} for j, p in enumerate(curve)]
    rule = {"any_of": [{"all_of": [v.above_node(f"{c}: gold drop from peak to largest KL", 0.0),
                                   v.above_node(f"{c}: RM gain from gold's peak to largest KL", 0.0)]}
                       for c in ("best-of-n", "PPO")]}
    lowest = StageDir(st.runs.dir(_kl_run(st, min(_kl_coefs(st)))), "ppo")
    trajectory = [{"iteration": r["iteration"], "kl": r["kl_per_sequence"], "rm": r["rm_score_mean"],
                   "gold": r.get("gold_score")} for r in read_metrics(lowest.metrics_file) if "kl_per_sequence" in r]
    return [finding("over_optimisation", "Optimising the RM harder (more KL) keeps raising the RM score while "
                    "the gold score rises, then falls.", "Gao et al. 2022, Figure 1 (the paper's Section 5 "
                    "risk); InstructGPT Appendix C.4 (the KL penalty guards against it)", measured, rule,
                    [base] + [p["run"] for p in ppo], curves=curves, ppo_trajectory=trajectory,
                    ppo_trajectory_beta=min(_kl_coefs(st)),
                    samples_per_prompt=k)]


EXPERIMENTS: dict[str, Experiment] = {e.name: e for e in (
    Experiment("preference", "Preference over SFT", lambda st: st.seed_runs(), preference),
    Experiment("small_beats_large", "A small aligned model beats a larger SFT model",
               lambda st: [seed_run(st.seeds[0]), large_sft(st)], small_beats_large),
    Experiment("ptx", "ptx fixes the regressions; a larger KL alone does not", ptx_needs, ptx),
    Experiment("rm_vs_labelers", "RM accuracy against inter-labeler agreement", lambda st: st.seed_runs(),
               rm_vs_labelers),
    Experiment("kl_coef", "The KL coefficient", kl_needs, kl_coef),
    Experiment("batch_size", "Batch sizes", lambda st: [seed_run(st.seeds[0]), *_batch_runs(st)], batch_sizes),
    Experiment("over_optimisation", "Reward over-optimisation", kl_needs, over_optimisation),
)}
