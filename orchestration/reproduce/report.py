"""findings/report.md and its plots, from results.json alone (every number printed is in it)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt  # noqa: E402


def leaves(rule: dict) -> list[str]:
    """The quantities a rule reads, in order."""
    if "test" in rule:
        return [rule["quantity"]]
    if "requires" in rule:
        return leaves(rule["requires"]) + leaves(rule["then"])
    (_, parts), = rule.items()
    return [q for p in parts for q in leaves(p)]


def _fig(m: dict) -> str:
    lo, hi = m["ci95"]
    return f"{m['value']:.3f} [{lo:.3f}, {hi:.3f}]"


def _cell(x) -> str:
    return _fig(x) if isinstance(x, dict) else f"{x:.3f}" if isinstance(x, float) else str(x)


def _seeds(m: dict) -> str:
    n = len(m.get("seeds", []))
    return f"{n} seed{'s' if n != 1 else ''}"


def summary_table(results: dict) -> str:
    lines = ["| # | finding | the paper | ours (95% interval) | verdict |", "|---|---|---|---|---|"]
    for i, f in enumerate(results["findings"], 1):
        ours = "<br>".join(f"{q}: {_fig(f['measured'][q])} ({_seeds(f['measured'][q])})"
                           for q in dict.fromkeys(leaves(f["rule"])))
        lines.append(f"| {i} | {f['claim']} | {f['paper']} | {ours} | **{f['verdict']}** |")
    return "\n".join(lines)


def _plot_preference(f: dict, out: Path) -> Path:
    names = [q for q in f["measured"] if q.startswith("win ")]
    vals = [f["measured"][q]["value"] for q in names]
    err = [[v - f["measured"][q]["ci95"][0] for q, v in zip(names, vals)],
           [f["measured"][q]["ci95"][1] - v for q, v in zip(names, vals)]]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar(names, vals, yerr=err, capsize=4, color=["#4c72b0", "#dd8452"][:len(names)])
    ax.axhline(0.5, color="grey", ls="--", lw=1)
    ax.set_ylabel("gold win rate vs SFT")
    ax.set_title("Preference over SFT (95% interval, seeds x prompts)")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def _plot_sweep(f: dict, x: str, ys: list[str], xlabel: str, out: Path) -> Path:
    sweep = f["sweep"]
    fig, axes = plt.subplots(1, len(ys), figsize=(4.5 * len(ys), 3.2))
    for ax, y in zip([axes] if len(ys) == 1 else axes, ys):
        xs = [p[x] for p in sweep]
        vals = [p[y]["value"] for p in sweep]
        lo = [p[y]["value"] - p[y]["ci95"][0] for p in sweep]
        hi = [p[y]["ci95"][1] - p[y]["value"] for p in sweep]
        ax.errorbar(range(len(xs)), vals, yerr=[lo, hi], marker="o", capsize=3)
        ax.set_xticks(range(len(xs)), [f"{v:g}" for v in xs])
        ax.set_xlabel(xlabel)
        ax.set_ylabel(y)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def _plot_over_optimisation(f: dict, out: Path) -> Path:
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    for name, curve in f["curves"].items():
        kl = [p["kl"] for p in curve]
        left.plot(kl, [p["gold"] for p in curve], marker="o", label=name)
        right.plot(kl, [p["rm"] for p in curve], marker="o", label=name)
    traj = [p for p in f.get("ppo_trajectory", []) if p["gold"] is not None]
    if traj:
        label = f"PPO, beta={f['ppo_trajectory_beta']:g}, per iteration (training batch)"
        left.plot([p["kl"] for p in traj], [p["gold"] for p in traj], lw=0.8, alpha=0.6, label=label)
        right.plot([p["kl"] for p in traj], [p["rm"] for p in traj], lw=0.8, alpha=0.6, label=label)
    left.set(xlabel="KL to SFT (nats)", ylabel="gold score", title="gold")
    right.set(xlabel="KL to SFT (nats)", ylabel="RM score", title="reward model")
    left.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def plots(results: dict, folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    by_name = {f["name"]: f for f in results["findings"]}
    made = {}
    if "preference" in by_name:
        made["preference"] = _plot_preference(by_name["preference"], folder / "preference.png")
    if "ptx_fixes_regressions" in by_name:
        made["ptx_fixes_regressions"] = _plot_sweep(by_name["ptx_fixes_regressions"], "ptx_coef",
                                                    ["LM loss vs SFT", "gold"], "ptx coefficient",
                                                    folder / "ptx_sweep.png")
    if "kl_coef" in by_name:
        made["kl_coef"] = _plot_sweep(by_name["kl_coef"], "beta", ["gold"], "KL coefficient beta",
                                      folder / "kl_sweep.png")
    if "over_optimisation" in by_name:
        made["over_optimisation"] = _plot_over_optimisation(by_name["over_optimisation"],
                                                            folder / "over_optimisation.png")
    return made


def _details(i: int, f: dict, plot: Path | None, out: Path) -> list[str]:
    lines = [f"## {i}. {f['claim']}", "", f"The paper: {f['paper']}.", "",
             f"Rule: {f['rule_text']}. Verdict: **{f['verdict']}**.", "", "| quantity | value [95% interval] | seeds |",
             "|---|---|---|"]
    lines += [f"| {q} | {_fig(m)} | {', '.join(map(str, m.get('seeds', [])))} |" for q, m in f["measured"].items()]
    for key in ("sweep", "curves"):
        if key not in f:
            continue
        lines += ["", f"{key.capitalize()}:", ""]
        rows = f[key] if key == "sweep" else [dict(p, curve=c) for c, pts in f[key].items() for p in pts]
        cols = list(dict.fromkeys(c for r in rows for c in r if c != "run"))
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in rows:
            lines.append("| " + " | ".join(_cell(r.get(c, "")) for c in cols) + " |")
    if "parameters" in f:
        p = f["parameters"]
        lines += ["", f"Parameters: policy {p['policy']:,}, large SFT {p['large_sft']:,} ({p['ratio']:.1f}x)."]
    if plot is not None:
        lines += ["", f"![{f['name']}]({plot.relative_to(out)})"]
    lines += ["", f"Runs: {', '.join(dict.fromkeys(f['runs']))}.", ""]
    return lines


def write_report(out: Path, results: dict) -> Path:
    made = plots(results, out / "plots")
    cmd = results["command"]
    lines = ["# The InstructGPT paper's findings, in miniature", "",
             f"`instructray reproduce{' ' + cmd['config'] if cmd['config'] else ''} --seeds {cmd['seeds']}"
             f"{' --quick' if cmd['quick'] else ''}{' --only ' + ' '.join(cmd['only']) if cmd['only'] else ''}` "
             f"at commit {results['commit']}, finished {results['finished']}."
             + (" **--quick: toy sizes; these numbers mean nothing.**" if cmd["quick"] else ""), "",
             "Each verdict follows its rule from the 95% intervals (over seeds, then prompts or text blocks "
             "within a seed); the rule is printed with each finding below. Every number here is in "
             "results.json, with the config, seed and commit of each run.", "",
             summary_table(results), ""]
    for i, f in enumerate(results["findings"], 1):
        lines += _details(i, f, made.get(f["name"]), out)
    base = " ".join(cmd["overrides"]) or "none"
    lines += ["## Runs", "", f"Every run: the config{' (--quick sizes)' if cmd['quick'] else ''}, overrides: {base}; "
              "then `run.seed` and `data.synthetic.seed` set to the run's seed, and its own overrides. Full "
              "configs in results.json.", "", "| run | seed | its own overrides | stages 0-2 from | commit "
              "| wall time (s) |", "|---|---|---|---|---|---|"]
    for name, r in results["runs"].items():
        lines.append(f"| {name} | {r['seed']} | {' '.join(r['run_overrides']) or '-'} | "
                     f"{r['borrowed_stages_from'] or '-'} | {r['commit'][:12]} | {r['wall_s']} |")
    path = out / "report.md"
    tmp = out / ".report.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)
    return path
