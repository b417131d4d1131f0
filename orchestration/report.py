"""`<run>/report.md`: the evaluation table, the ptx effect as measured, and PNG plots.

Reads what exists (eval/results.json, each stage's metrics.jsonl) and leaves out
what does not; a missing metric is a gap in the report, never a crash.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

from orchestration.rundir import read_metrics  # noqa: E402

ORDER = ("SFT", "PPO", "PPO-ptx")
COLORS = {"SFT": "#9e9e9e", "PPO": "#4c72b0", "PPO-ptx": "#dd8452"}  # one colour per policy everywhere
# stage folder -> report name when results.json does not say (ppo/ holds PPO-ptx by default)
DEFAULT_STAGES = {"ppo_noptx": "PPO", "ppo": "PPO-ptx"}
# PPO optimised against this very RM, so its verdict flatters PPO (Goodhart).
RM_CAVEAT = " (the RM the PPO policies were trained against, so an optimistic judge)"
CURVES = (("rm_score_mean", "RM reward"), ("heldout_gold_score", "gold score, fixed held-out prompts"),
          ("gold_score", "gold score, this iteration's batch"),
          ("kl_per_sequence", "KL to SFT (nats / sequence)"), ("ptx_loss", "ptx LM loss"))


def load_results(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / "eval" / "results.json"
    return json.loads(path.read_text()) if path.exists() else None


def _f(x, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _ci(ci) -> str:
    return f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""


def _responses(n: int) -> str:
    return "one response each" if n == 1 else f"{n} independent responses each"


def _signed(x, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:+.{digits}f}"


def format_table(results: dict) -> str:
    """Markdown table, one row per policy; win rates are against SFT with 95% bootstrap CIs."""
    rows = results["policies"]
    lines = ["| policy | gold win rate vs SFT | gold score | exact | RM win rate vs SFT | RM score "
             "| KL to SFT | held-out LM loss (vs SFT) | tokens |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in [n for n in ORDER if n in rows] + [n for n in rows if n not in ORDER]:
        r = rows[name]
        gold_wr = (_f(r["gold_win_rate"], 2) + _ci(r.get("gold_win_rate_ci"))) if "gold_win_rate" in r else "n/a"
        rm_wr = (_f(r["rm_win_rate"], 2) + _ci(r.get("rm_win_rate_ci"))) if "rm_win_rate" in r else "n/a"
        label = f"{name} (resampled)" if name == "SFT" else name
        lm = f"{_f(r.get('lm_loss'))} ({_signed(r.get('lm_loss_delta_vs_sft'))})"
        lines.append(f"| {label} | {gold_wr} | {_f(r.get('gold_score_mean'))} | {_f(r.get('gold_exact'), 2)} "
                     f"| {rm_wr} | {_f(r.get('rm_score_mean'))} | {_f(r.get('kl_to_sft'), 2)} | {lm} "
                     f"| {_f(r.get('response_tokens_mean'), 1)} |")
    return "\n".join(lines)


def family_table(results: dict) -> str | None:
    """Gold score per task family and policy (synthetic task only): where RL gains, and where
    the reward model leaves the SFT policy's mistakes in place. None without per-family scores."""
    rows = results["policies"]
    names = [n for n in ORDER if n in rows and "gold_by_family" in rows[n]]
    if not names:
        return None
    families = sorted({f for n in names for f in rows[names[0]]["gold_by_family"]})
    lines = ["| family | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for f in families:
        lines.append(f"| {f} | " + " | ".join(_f(rows[n]["gold_by_family"].get(f)) for n in names) + " |")
    return "\n".join(lines)


def ptx_statement(results: dict) -> str:
    """The ptx effect in words, from the numbers and their intervals (whatever they say)."""
    rows, eff = results["policies"], results.get("ptx_effect")
    if "PPO" not in rows or "PPO-ptx" not in rows or not eff:
        have = ", ".join(rows)
        return f"Not measured: the comparison needs both PPO and PPO-ptx (this run has {have})."
    sft, ppo, ptx = rows["SFT"]["lm_loss"], rows["PPO"], rows["PPO-ptx"]
    lo, hi = ppo["lm_loss_delta_vs_sft_ci"]
    reg = ppo["lm_loss_delta_vs_sft"]
    if lo > 0:
        verdict = f"PPO without ptx raised it by {reg:+.3f} nats (95% CI [{lo:+.3f}, {hi:+.3f}]): a regression."
    elif hi < 0:
        verdict = f"PPO without ptx lowered it by {reg:+.3f} nats (CI [{lo:+.3f}, {hi:+.3f}]): no regression here."
    else:
        verdict = f"PPO without ptx changed it by {reg:+.3f} nats (CI [{lo:+.3f}, {hi:+.3f}]): not distinguishable from 0."
    d, (dlo, dhi) = eff["lm_loss_ptx_minus_ppo"], eff["lm_loss_ptx_minus_ppo_ci"]
    if dhi < 0:
        fix = f"PPO-ptx's loss is lower than PPO's by {-d:.3f} nats (CI [{dlo:+.3f}, {dhi:+.3f}])"
        if reg > 0 and ptx["lm_loss"] <= sft:
            fix += ", undoing all of PPO's regression (it ends at or below SFT's loss)"
        elif reg > 0:
            fix += f", undoing {100 * -d / reg:.0f}% of PPO's regression"
        fix += "."
    elif dlo > 0:
        fix = f"PPO-ptx's loss is higher than PPO's by {d:.3f} nats (CI [{dlo:+.3f}, {dhi:+.3f}]): ptx did not help."
    else:
        fix = f"PPO-ptx minus PPO is {d:+.3f} nats (CI [{dlo:+.3f}, {dhi:+.3f}]): no measurable ptx effect."
    text = (f"Held-out pretraining LM loss: SFT {sft:.3f}, PPO {ppo['lm_loss']:.3f}, "
            f"PPO-ptx {ptx['lm_loss']:.3f}. {verdict} {fix}")
    if "win_rate_ptx_vs_ppo" in eff:
        text += (f" On the instructions, PPO-ptx beats PPO {eff['win_rate_ptx_vs_ppo']:.2f}"
                 f"{_ci(eff.get('win_rate_ptx_vs_ppo_ci'))} of the time ({eff['judge']} judge).")
    return text


def rm_accuracy(run_dir: str | Path) -> dict[str, float]:
    """Accuracy-like numbers the RM stage left: the last finite value of each `*acc*` key."""
    rm = Path(run_dir) / "rm"
    records = read_metrics(rm / "metrics.jsonl")
    for extra in sorted(rm.glob("*.json")) if rm.exists() else []:
        try:
            data = json.loads(extra.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(data, dict):
            records.append(data)
    found: dict[str, float] = {}
    for rec in records:
        for k, v in rec.items():
            if "acc" in k.lower() and _number(v):
                found[k] = float(v)
    return found


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _rm_lines(acc: dict[str, float]) -> list[str]:
    held = {k: v for k, v in acc.items() if k.lower().startswith(("val", "test", "eval", "held"))}
    lines = [f"- held-out {k}: {v:.3f}" for k, v in sorted(held.items())]
    lines += [f"- training {k} (last logged): {v:.3f}" for k, v in sorted(acc.items()) if k not in held]
    return lines or ["No RM accuracy was recorded."]


def _stage_names(run_dir: Path, results: dict | None) -> dict[str, str]:
    """stage folder name -> policy name, from results.json when it is there."""
    if results:
        return {Path(p).parent.name: name for name, p in results["settings"]["paths"].items()
                if name != "SFT"}
    return {s: n for s, n in DEFAULT_STAGES.items() if (run_dir / s / "metrics.jsonl").exists()}


def plot_training_curves(run_dir: Path, names: dict[str, str], out: Path) -> Path | None:
    series = {names[s]: read_metrics(run_dir / s / "metrics.jsonl") for s in names}
    panels = [(k, t) for k, t in CURVES if any(_number(r.get(k)) for recs in series.values() for r in recs)]
    if not panels:
        return None
    cols = min(2, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.0 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (key, title) in zip(axes.flat, panels):
        for name, recs in series.items():
            pts = [(r.get("iteration", r.get("step")), r[key]) for r in recs if _number(r.get(key))]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=name,
                        color=COLORS.get(name))
        ax.set_title(title)
        ax.set_xlabel("PPO iteration")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _bars(names, values, cis, ylabel, title, out: Path, ref: float | None = None,
          ticks: list[str] | None = None) -> Path:
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2.0, 3.6))
    err = None
    if all(c is not None for c in cis):
        err = [[v - c[0] for v, c in zip(values, cis)], [c[1] - v for v, c in zip(values, cis)]]
    ax.bar(ticks or names, values, yerr=err, capsize=6, color=[COLORS.get(n) for n in names])
    if ref is not None:
        ax.axhline(ref, color="black", linestyle="--", linewidth=1)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    for i, v in enumerate(values):
        ax.annotate(f"{v:.2f}", (i, v), textcoords="offset points", xytext=(12, 3), fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def truthfulqa_table(tq: dict) -> str:
    """MC1/MC2 per policy beside chance, with what the figures can mean at this model size."""
    lines = [f"Multiple choice by log-likelihood on {tq['questions']} questions, zero-shot, scored by "
             f"{tq['harness']} (MC1: the best answer is the likeliest; MC2: the likelihood mass on "
             "correct answers). The paper reports InstructGPT more truthful than GPT-3 here. "
             "A model with no knowledge of the world (as the tiny ones are) scores near chance, so "
             "differences between policies then say nothing about truthfulness.", "",
             "| policy | MC1 | MC2 |", "|---|---|---|"]
    lines += [f"| {name} | {s['mc1']:.3f} | {s['mc2']:.3f} |" for name, s in tq["policies"].items()]
    lines.append(f"| chance | {tq['chance']['mc1']:.3f} | {tq['chance']['mc2']:.3f} |")
    return "\n".join(lines)


def plot_win_rates(results: dict, out: Path) -> Path | None:
    """Like the paper's Figure 1: each policy's win rate against SFT (SFT: fresh samples)."""
    rows = results["policies"]
    names = [n for n in ORDER if n in rows and "win_rate" in rows[n]]
    if not names:
        return None
    judge = rows[names[0]].get("win_rate_judge", "")
    return _bars(names, [rows[n]["win_rate"] for n in names], [rows[n].get("win_rate_ci") for n in names],
                 "win rate against SFT", f"{judge} judge, 95% CI", out, ref=0.5,
                 ticks=["SFT\n(resampled)" if n == "SFT" else n for n in names])


def plot_lm_loss(results: dict, out: Path) -> Path | None:
    rows = results["policies"]
    names = [n for n in ORDER if n in rows and "lm_loss" in rows[n]]
    if not names:
        return None
    return _bars(names, [rows[n]["lm_loss"] for n in names], [rows[n].get("lm_loss_ci") for n in names],
                 "nats / token", "held-out pretraining LM loss, 95% CI", out)


def write_report(run_dir: str | Path) -> str:
    """Write report.md and plots/*.png; return the table (or a note when there are no results)."""
    run_dir = Path(run_dir)
    plots = run_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    results = load_results(run_dir)
    lines = [f"# Report: {run_dir.name}", ""]
    table = "no evaluation results (eval/results.json is missing): run `instructray eval`"
    pngs: list[tuple[str, Path | None]] = []
    if results:
        s = results["settings"]
        table = format_table(results)
        lines += ["## Policies on held-out prompts", "",
                  f"{s['num_prompts']} held-out prompts, {_responses(s.get('samples_per_prompt', 1))} at temperature "
                  f"{s['temperature']} "
                  f"(at most {s['max_response_tokens']} tokens); win rates against SFT judged by the "
                  f"{s['judge']} scorer{RM_CAVEAT if s['judge'] == 'rm' else ''}, ties counted half, 95% bootstrap "
                  "intervals over prompts. The SFT row "
                  "compares fresh SFT samples with SFT's: the noise floor. KL to SFT is the mean over samples "
                  "of log pi(y|x) - log pi_SFT(y|x) (nats per response). LM loss is on "
                  f"{s['num_blocks']} held-out blocks of {s['block_len']} pretraining tokens.", "",
                  table, "", "## The ptx effect", "", ptx_statement(results), ""]
        families = family_table(results)
        if families is not None:
            lines += ["## Gold score by task family", "",
                      "Mean gold score of each policy's held-out responses per task family (SFT: its "
                      "resampled row): where RL gains, and where the RM leaves SFT's mistakes in place.",
                      "", families, ""]
        if results.get("truthfulqa"):
            lines += ["## TruthfulQA (public NLP benchmark)", "", truthfulqa_table(results["truthfulqa"]), ""]
        pngs += [("Win rate against SFT", plot_win_rates(results, plots / "win_rates.png")),
                 ("Held-out pretraining LM loss", plot_lm_loss(results, plots / "lm_loss.png"))]
    acc = rm_accuracy(run_dir)
    lines += ["## Reward model", ""]
    lines += _rm_lines(acc)
    lines.append("")
    pngs.append(("PPO training curves",
                 plot_training_curves(run_dir, _stage_names(run_dir, results), plots / "training_curves.png")))
    lines += ["## Plots", ""]
    for title, path in pngs:
        if path is not None:
            lines += [f"### {title}", "", f"![{title}](plots/{path.name})", ""]
    (run_dir / "report.md").write_text("\n".join(lines))
    return table
