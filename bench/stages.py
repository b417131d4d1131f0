"""Stages 0-2 on the embedded default (seeded): what each stage buys, measured on held-out data.

    .venv/bin/python bench/stages.py [--out DIR] [--run-dir RUN] [--skip-hh] [key=value ...]

Runs pretrain -> SFT -> RM -> SFT selection with Ray Train on configs/tiny.yaml
(overrides allowed), then measures on held-out data:
- stage 0: held-out LM loss of the untrained vs the pretrained model;
- the gold labeler's mean score of T=1 samples of the base vs the SFT model on
  test prompts (and the share of exact answers);
- the RM's pairwise accuracy against the noiseless gold ranking and against
  the noisy labels: on the RM stage's validation rankings, and with 95%
  intervals on 2000 fresh test-split rankings beside the labelers themselves
  (a second noisy labeler: the paper's inter-labeler yardstick; the gold
  labeler: the most any predictor of noisy labels can reach); and against the
  gold labeler on pairs of the SFT policy's own samples (what PPO shows it);
- the RM on random tokens up to the response limit without EOS (what an
  over-optimised policy wrote) beside the answer;
- the RM training step with rankings packed (each prompt once, several to a row) vs one padded
  row per completion (same batches, alternated);
- the RM stage on HH-RLHF harmless test pairs (../shared/data) with a tiny
  model whose tokenizer is trained on that text (skipped if the data is absent);
- wall time of every stage.
Prints the numbers and writes them to DIR/stages.json.
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import random
import sys
import time
from pathlib import Path

import torch

from orchestration import pipeline, stage_data
from orchestration.reproduce.measures import agreements, rm_against_labelers
from orchestration.rundir import StageDir
from orchestration.stages import harness, pretrain, rm, sft
from rlhf.collate import TokenLimits, collate_encoded, collate_rankings, encode_pair
from rlhf.config import Config, load_config
from rlhf.data import Demonstration, PromptRecord, TextRecord, write_jsonl
from rlhf.data.adapters import hh_rlhf
from rlhf.losses import rm_ranking_loss
from rlhf.models import ScalarModel, load_policy, load_tokenizer
from rlhf.sampling import SampledChunk, decode_responses, sample_and_score
from rlhf.synthetic import format_response, gold_score, parse_prompt

ROOT = Path(__file__).resolve().parent.parent
HH_FILE = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base_test.jsonl.gz"
HH_OVERRIDES = [  # longer dialogues than the synthetic prompts; the model stays tiny
    "data.source=files", "pretrain.enabled=false", "model.context_length=192", "model.tiny.n_positions=192",
    "model.max_prompt_tokens=128", "model.max_response_tokens=64"]


def _prompt_ids(tokenizer, prompts: list[str]) -> list[list[int]]:
    return [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]


def _texts(tokenizer, chunk: SampledChunk) -> list[str]:
    # Special tokens kept, as these figures were first measured: a sampled pad counts as a word.
    return decode_responses(tokenizer, chunk.samples, skip_special_tokens=False)


@torch.no_grad()
def gold_eval(model_dir: str | Path, prompts: list[str], cfg: Config, seed: int) -> dict:
    """Mean gold score and exact-answer rate of one T=1 sample per prompt."""
    tokenizer, policy = load_tokenizer(model_dir), load_policy(model_dir).eval()
    scores = sample_and_score(
        policy, tokenizer, _prompt_ids(tokenizer, prompts),
        lambda c: [gold_score(parse_prompt(prompts[i]), r) for i, r in zip(c.rows, _texts(tokenizer, c))],
        chunk_size=64, max_new_tokens=cfg.model.max_response_tokens, seed=seed)
    return {"gold_mean": sum(scores) / len(scores), "exact": sum(x == 1.0 for x in scores) / len(scores),
            "n": len(scores)}


@torch.no_grad()
def rm_on_sft_samples(cfg: Config, k: int = 8, seed: int = 1) -> dict:
    """The RM against the gold labeler on the SFT policy's own T=1 samples (k per test prompt),
    the distribution PPO shows it (unlike the held-out rankings of the answer and its
    corruptions): pairwise accuracy (identical responses and gold ties left out), and the
    gold score of the RM's favourite of the k beside the mean: the gain best-of-k sampling
    against this RM would give, a yardstick for what optimising it can buy."""
    policy_dir, rm_dir = StageDir(cfg.output_dir, "sft").final, StageDir(cfg.output_dir, "rm").final
    tokenizer, policy = load_tokenizer(policy_dir), load_policy(policy_dir).eval()
    reward = ScalarModel.from_pretrained(rm_dir).eval()
    rows = [p for r in stage_data.load(cfg, "prompts", "test") for p in [r.prompt] * k]

    def score(c: SampledChunk) -> list[tuple[str, float, float]]:
        rm_scores = reward.score(c.samples.input_ids, c.samples.attention_mask).tolist()
        return [(text, gold_score(parse_prompt(rows[i]), text), rm_score)
                for i, text, rm_score in zip(c.rows, _texts(tokenizer, c), rm_scores)]

    # 64 prompts (x k samples) per sampling call, so each prompt's k samples share a call
    sampled = sample_and_score(policy, tokenizer, _prompt_ids(tokenizer, rows), score, chunk_size=64 * k,
                               max_new_tokens=cfg.model.max_response_tokens, seed=seed)
    texts, gold, scores = (list(x) for x in zip(*sampled))
    right = pairs = 0
    mean_gold, best_gold = [], []
    for g in range(0, len(rows), k):
        mean_gold.append(sum(gold[g:g + k]) / k)
        best_gold.append(gold[max(range(g, g + k), key=scores.__getitem__)])
        for a, b in itertools.combinations(range(g, g + k), 2):
            if texts[a] != texts[b] and gold[a] != gold[b]:
                pairs += 1
                right += (gold[a] > gold[b]) == (scores[a] > scores[b])
    return {"accuracy": right / max(pairs, 1), "n_pairs": pairs, "samples_per_prompt": k,
            "gold_mean": sum(mean_gold) / len(mean_gold), "gold_of_rm_best": sum(best_gold) / len(best_gold)}


@torch.no_grad()
def rm_on_junk_without_eos(cfg: Config, n_prompts: int = 200, seed: int = 0) -> dict:
    """How the RM scores what over-optimised PPO policies wrote here: random tokens up to the
    response limit with no EOS. Beside it, the answer itself (with EOS). The share of prompts
    where the junk outscores the answer is the opening a policy can exploit."""
    final = StageDir(cfg.output_dir, "rm").final
    tokenizer, reward = load_tokenizer(final), ScalarModel.from_pretrained(final).eval()
    limits = TokenLimits(cfg.model.max_prompt_tokens, cfg.model.max_response_tokens)
    rng = random.Random(seed)
    normal = [i for i in range(len(tokenizer)) if i not in tokenizer.all_special_ids]
    answer, junk = [], []
    for p in [r.prompt for r in stage_data.load(cfg, "prompts", "test")][:n_prompts]:
        ids, mask = encode_pair(tokenizer, p, format_response(parse_prompt(p).answer), limits)
        noise = [rng.choice(normal) for _ in range(limits.max_response_tokens)]
        batch = collate_encoded([(ids, mask), (ids[:mask.index(1)] + noise, [])], tokenizer.pad_token_id)
        a, j = reward.score(batch.input_ids, batch.attention_mask).tolist()
        answer.append(a)
        junk.append(j)
    return {"answer_mean": sum(answer) / len(answer), "junk_mean": sum(junk) / len(junk),
            "junk_beats_answer": sum(j > a for a, j in zip(answer, junk)) / len(answer), "prompts": len(answer)}


def rm_packing(cfg: Config, n_batches: int = 40, seed: int = 0) -> dict:
    """RM training step (forward, ranking loss, backward) on the same training batches, two layouts.

    packed: the stage's own, each prompt once, several to a row (`rlhf.collate.collate_rankings`);
    per_completion: the plain one, a padded row of prompt + completion per completion.
    Tokens count padding (what the model computes on). Alternating the two keeps machine noise out of the ratio.
    """
    final = StageDir(cfg.output_dir, "rm").final
    tokenizer, model = load_tokenizer(final), ScalarModel.from_pretrained(final).train()
    train = rm.rankings(cfg, tokenizer, "train")
    batches = [random.Random(seed + i).sample(train, cfg.rm.batch_size) for i in range(n_batches)]
    pad = tokenizer.pad_token_id

    def packed(groups):
        b = collate_rankings(groups, pad)
        return rm.rm_scores(model, b), b.ranks, b.group_ids, b.input_ids.numel()

    def per_completion(groups):
        b = collate_encoded([(g.prompt + r, []) for g in groups for r in g.responses], pad)
        ranks = torch.tensor([k for g in groups for k in g.ranks])
        group_ids = torch.tensor([i for i, g in enumerate(groups) for _ in g.responses])
        return model.score(b.input_ids, b.attention_mask), ranks, group_ids, b.input_ids.numel()

    layouts = {"packed": packed, "per_completion": per_completion}
    seconds, tokens = dict.fromkeys(layouts, 0.0), dict.fromkeys(layouts, 0)
    for groups in batches:
        for name, layout in layouts.items():
            start = time.perf_counter()
            scores, ranks, group_ids, n_tokens = layout(groups)
            rm_ranking_loss(scores, ranks, group_ids)[0].backward()
            seconds[name] += time.perf_counter() - start
            tokens[name] += n_tokens
            model.zero_grad()
    out = {name: {"s_per_step": seconds[name] / n_batches, "tokens_per_step": tokens[name] / n_batches}
           for name in layouts}
    out["speedup"] = seconds["per_completion"] / seconds["packed"]
    return out


def noise_ceiling(cfg: Config) -> float:
    """Accuracy of the gold labeler itself on the noisy held-out pairs (gold ties count 1/2)."""
    right = total = 0.0
    for c in stage_data.load(cfg, "comparisons", "valid"):
        task = parse_prompt(c.prompt)
        right += agreements([gold_score(task, r) for r in c.responses], c.pairs())
        total += len(c.pairs())
    return right / total


STAGES_0_2 = ("pretrain", "sft", "rm", "sft_select")


def finished_results(cfg: Config) -> dict:
    """{step: summary} of the stages 0-2 a run already finished (the pipeline skips those)."""
    results = {}
    timing = cfg.output_dir / "pipeline.json"  # wall times, when `instructray run` made the run
    walls = {k: v.get("wall_s") for k, v in json.loads(timing.read_text()).items()} if timing.exists() else {}
    for name in ("pretrain", "sft", "rm"):
        path = StageDir(cfg.output_dir, name).path / harness.SUMMARY
        if path.exists():
            results[name] = {"wall_s": walls.get(name), **json.loads(path.read_text())}
    selection = StageDir(cfg.output_dir, "sft").path / sft.SELECTION
    if selection.exists():
        results["sft_select"] = json.loads(selection.read_text())
    return results


def synthetic_run(cfg: Config) -> dict:
    results = finished_results(cfg)
    if not all(name in results for name in STAGES_0_2):
        results.update(pipeline.main(cfg, steps=[s for s in pipeline.STEPS if s.name in STAGES_0_2]))
    test_prompts = [r.prompt for r in stage_data.load(cfg, "prompts", "test")]
    out = {"wall_s": {k: round(v["wall_s"], 1) for k, v in results.items() if v.get("wall_s") is not None}}
    out["pretrain"] = {k: results["pretrain"][k] for k in ("val_loss_untrained", "val_loss")}
    out["gold_test_T1"] = {
        "base": gold_eval(StageDir(cfg.output_dir, "pretrain").final, test_prompts, cfg, cfg.run.seed),
        "sft": gold_eval(StageDir(cfg.output_dir, "sft").final, test_prompts, cfg, cfg.run.seed)}
    out["sft"] = {"val_loss": results["sft"]["val_loss"], "selection": results.get("sft_select")}
    valid = results["rm"]["valid"]
    out["rm"] = {"acc_vs_gold": valid["gold"]["accuracy"], "acc_vs_noisy": valid["noisy"]["accuracy"],
                 "pairs_gold": valid["gold"]["n_pairs"], "pairs_noisy": valid["noisy"]["n_pairs"],
                 "noise_ceiling_empirical": noise_ceiling(cfg),
                 "acc_vs_gold_on_sft_samples": rm_on_sft_samples(cfg),
                 "against_labelers": rm_against_labelers(cfg),
                 "packing": rm_packing(cfg),
                 "junk_without_eos": rm_on_junk_without_eos(cfg),
                 "labeler_agreement": cfg.data.synthetic.labeler_agreement,
                 "reward_bias": results["rm"]["reward_bias"]}
    return out


def write_hh_files(folder: Path) -> list[str]:
    """HH pairs -> canonical JSONL through the adapter; the config overrides that point at them."""
    pairs = hh_rlhf(HH_FILE)
    files = {"comparisons": pairs,
             "demonstrations": [Demonstration(c.prompt, c.responses[0]) for c in pairs],  # the chosen replies
             "prompts": [PromptRecord(c.prompt) for c in pairs],
             "pretrain_text": [TextRecord(c.prompt + c.responses[0]) for c in pairs]}
    for name, records in files.items():
        write_jsonl(records, folder / f"{name}.jsonl")
    return [f"data.{name}={folder / f'{name}.jsonl'}" for name in files]


def hh_run(out: Path, overrides: list[str]) -> dict:
    """The RM stage on HH-RLHF pairs, from a tiny untrained model whose tokenizer knows the text."""
    base = overrides + HH_OVERRIDES + write_hh_files(out / "hh-data") + [f"run.output_dir={out / 'hh'}"]
    cfg = load_config("tiny", base)
    stage_data.materialise(cfg)  # the tokenizer is trained on the training split's text
    cfg = load_config("tiny", base + [f"model.reward={pretrain.ensure_tiny_base(cfg)}"])
    start = time.perf_counter()
    summary = rm.main(cfg)
    return {"acc_vs_labels": summary["valid"]["noisy"]["accuracy"], "pairs": summary["valid"]["noisy"]["n_pairs"],
            "train_prompts": summary["train_prompts"], "wall_s": round(time.perf_counter() - start, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "stages"))
    parser.add_argument("--skip-hh", action="store_true")
    parser.add_argument("--run-dir", help="measure this run's stages 0-2 (e.g. runs/tiny of `instructray run`); "
                                          "stages it lacks are trained there")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out = Path(args.out).resolve()
    run_dir = Path(args.run_dir).resolve() if args.run_dir else out / "tiny"
    cfg = load_config("tiny", args.overrides + [f"run.output_dir={run_dir}"])
    start = time.perf_counter()
    report = {"command": " ".join(sys.argv), "synthetic": synthetic_run(cfg)}
    report["synthetic"]["wall_s"]["stages_0_2_total"] = round(time.perf_counter() - start, 1)
    if args.skip_hh or not HH_FILE.exists():
        report["hh_rlhf"] = {"skipped": "--skip-hh" if args.skip_hh else f"{HH_FILE} not found"}
    else:
        report["hh_rlhf"] = hh_run(out, args.overrides)
    (out / "stages.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
