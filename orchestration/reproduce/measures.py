"""What the findings measure on finished runs: per-prompt numbers, paired across runs.

Evaluations of one seed's runs share their held-out prompts, in the same order, and
their SFT samples (same model, same seed), so any two policies of one seed compare
prompt by prompt. Everything here returns per-prompt (or per-block) values; the
intervals are taken by the experiments over seeds and prompts.
"""
from __future__ import annotations

import itertools
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from orchestration.rundir import StageDir
from orchestration.stages.evaluate import BLOCK_LOSSES, SAMPLES
from rlhf.collate import TokenLimits, collate_encoded, encode_pair
from rlhf.config import Config
from rlhf.evaluation import bootstrap_ci, group_means, paired_outcomes
from rlhf.models import ScalarModel, load_policy, load_tokenizer
from rlhf.sampling import decode_responses, sample_and_score
from rlhf.synthetic import SyntheticSuite, gold_score, parse_prompt, rank_responses


@dataclass
class RunEval:
    """A run's held-out evaluation: per row (prompt x sample) gold and RM scores, per block LM loss."""
    prompts: list[str]                  # one per row; each prompt `repeats` times in a row
    repeats: int
    gold: dict[str, list[float]]        # policy name -> per row
    rm: dict[str, list[float]]
    blocks: dict[str, list[float]]      # policy name -> per held-out text block
    results: dict                       # eval/results.json

    @classmethod
    def load(cls, run_dir: Path) -> "RunEval":
        ev = Path(run_dir) / "eval"
        results = json.loads((ev / "results.json").read_text())
        rows = [json.loads(line) for line in (ev / SAMPLES).read_text().splitlines()]
        names = [k for k in rows[0] if k != "prompt"]
        return cls(prompts=[r["prompt"] for r in rows], repeats=results["settings"]["samples_per_prompt"],
                   gold={n: [r[n]["gold"] for r in rows] for n in names},
                   rm={n: [r[n]["rm"] for r in rows] for n in names},
                   blocks=json.loads((ev / BLOCK_LOSSES).read_text()), results=results)

    def per_prompt(self, per_row: list[float]) -> list[float]:
        return group_means(per_row, self.repeats).tolist()

    def unique_prompts(self) -> list[str]:
        return self.prompts[::self.repeats]


def wins(a: list[float], b: list[float], repeats: int) -> list[float]:
    """Per prompt: how often a's sample beats b's (ties half), over the prompt's samples."""
    return group_means(paired_outcomes(a, b), repeats).tolist()


def differences(a: list[float], b: list[float]) -> list[float]:
    if len(a) != len(b):
        raise ValueError(f"paired values differ in length: {len(a)} vs {len(b)}")
    return [x - y for x, y in zip(a, b)]


def same_prompts(*evals: RunEval) -> None:
    """Paired comparisons need one held-out set: runs of one seed share it."""
    first = evals[0]
    for e in evals[1:]:
        if e.prompts != first.prompts:
            raise ValueError("runs evaluated on different held-out prompts cannot be paired")


def parameters(model_dir: Path) -> int:
    return sum(p.numel() for p in load_policy(model_dir).parameters())


@torch.no_grad()
def sample_gold(policy_dir: Path, prompts: list[str], max_new_tokens: int, seed: int) -> list[float]:
    """Gold score of one T=1 sample per entry of `prompts` (repeated prompts: independent samples)."""
    tok, policy = load_tokenizer(policy_dir), load_policy(policy_dir).eval()
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    return sample_and_score(policy, tok, ids, lambda c: [gold_score(parse_prompt(prompts[i]), t)
                                                         for i, t in zip(c.rows, c.responses)],
                            chunk_size=256, max_new_tokens=max_new_tokens, seed=seed)


@torch.no_grad()
def draw_scored(policy_dir: Path, rm_dir: Path, prompts: list[str], k: int, max_new_tokens: int,
                seed: int) -> list[list[tuple[str, float, float]]]:
    """Per prompt, k T=1 samples of the policy as (text, gold score, RM score)."""
    tok, policy = load_tokenizer(policy_dir), load_policy(policy_dir).eval()
    rm = ScalarModel.from_pretrained(rm_dir).eval()
    rows = [p for p in prompts for _ in range(k)]

    def score(c):
        texts = decode_responses(tok, c.samples)
        rm_scores = rm.score(c.samples.input_ids, c.samples.attention_mask).tolist()
        return [(t, gold_score(parse_prompt(rows[i]), t), s) for i, t, s in zip(c.rows, texts, rm_scores)]

    out = sample_and_score(policy, tok, [tok(p, add_special_tokens=False)["input_ids"] for p in rows], score,
                           chunk_size=64 * k, max_new_tokens=max_new_tokens, seed=seed)
    return [out[i:i + k] for i in range(0, len(out), k)]


def best_of_n_kl(n: int) -> float:
    """KL of best-of-n sampling to the sampled policy (the analytic bound Gao et al. 2022 plot)."""
    return math.log(n) - (n - 1) / n


def best_of_n(groups: list[list[tuple[str, float, float]]], n: int) -> tuple[list[float], list[float]]:
    """Per prompt, gold and RM score of the RM's favourite among the first n samples."""
    picked = [max(g[:n], key=lambda s: s[2]) for g in groups]
    return [p[1] for p in picked], [p[2] for p in picked]


def agreements(scores: list[float], pairs: list[tuple[int, int]]) -> float:
    """How many of the ordered (better, worse) pairs `scores` orders the same way, ties 1/2."""
    return float(paired_outcomes([scores[w] for w, _ in pairs], [scores[lo] for _, lo in pairs]).sum())


@torch.no_grad()
def rm_against_labelers(cfg: Config, n_prompts: int = 2000, seed: int = 1) -> dict:
    """The RM on a large fresh held-out set, beside the labelers it is measured against.

    n_prompts rankings of test-split prompts (never trained on) by the noisy labeler.
    On the pairs it orders, per prompt:
    - rm: how often the RM orders them its way (the paper's RM accuracy, 72.4%);
    - inter_labeler: how often a second, independent labeler does (the paper's
      yardstick: labelers agree with each other 72.6% of the time);
    - gold_labeler: how often the noiseless gold ranking does, the most any predictor
      of these labels can reach.
    And rm_vs_gold: the RM on the pairs the gold ranking orders. Each entry has the
    pooled accuracy, its 95% interval (prompts resampled) and the per-prompt
    (agreements, pairs) it pools, so figures across seeds can be resampled too.
    """
    syn = cfg.data.synthetic
    comps = SyntheticSuite(syn.seed, syn.labeler_agreement, syn.demo_noise, syn.families).comparisons(
        "test", n_prompts, syn.k_min, syn.k_max)
    rm_dir = StageDir(cfg.output_dir, "rm").final
    tokenizer, reward = load_tokenizer(rm_dir), ScalarModel.from_pretrained(rm_dir).eval()
    limits = TokenLimits(cfg.model.max_prompt_tokens, cfg.model.max_response_tokens)
    second = random.Random(f"second-labeler/{seed}")
    names = ("rm", "inter_labeler", "gold_labeler", "rm_vs_gold")
    per_prompt: dict[str, list[tuple[float, int]]] = {n: [] for n in names}
    for c in comps:
        task = parse_prompt(c.prompt)
        encoded = [encode_pair(tokenizer, c.prompt, r, limits) for r in c.responses]
        if any(e is None for e in encoded):
            continue
        batch = collate_encoded(encoded, tokenizer.pad_token_id)
        rm_score = reward.score(batch.input_ids, batch.attention_mask).tolist()
        gold = [gold_score(task, r) for r in c.responses]
        other = rank_responses(task, c.responses, second, syn.labeler_agreement)
        judges = {"rm": rm_score, "inter_labeler": [-r for r in other], "gold_labeler": gold}
        noisy_pairs = c.pairs()
        for name, scores in judges.items():
            per_prompt[name].append((agreements(scores, noisy_pairs), len(noisy_pairs)))
        gold_pairs = [(w, lo) for w, lo in itertools.permutations(range(len(gold)), 2) if gold[w] > gold[lo]]
        if gold_pairs:
            per_prompt["rm_vs_gold"].append((agreements(rm_score, gold_pairs), len(gold_pairs)))
    out: dict = {"prompts": len(per_prompt["rm"]), "split": "test"}
    for name, rows in per_prompt.items():
        right, pairs = zip(*rows)
        lo, hi = bootstrap_ci([r / n for r, n in rows], weights=pairs, seed=seed)
        out[name] = {"accuracy": sum(right) / sum(pairs), "ci95": [lo, hi], "pairs": sum(pairs),
                     "per_prompt": [list(r) for r in rows]}
    return out
