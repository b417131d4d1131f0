"""`instructray eval` (and the end of `run`): SFT vs PPO vs PPO-ptx on held-out data.

For every trained policy, on the same held-out prompts: responses sampled at
T=1 (the paper's PPO sampling temperature; its human-eval temperature is not
stated in Appendix C, so we keep 1), scored by the gold labeler (synthetic
task) and the RM; win rate against SFT; KL to SFT; LM loss on held-out
pretraining text, the regression the paper's ptx term is there to fix.

Each policy samples with its own fixed seed, so its responses are independent
of SFT's, as two labeler-compared outputs are. SFT is also sampled a second
time with another seed: its "win rate against SFT" is that fresh sample's, the
noise floor every other win rate should be read against.

Models run in this process (one at a time beside SFT and the RM): enough for
the tiny and small models this command is meant for, no Ray needed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from pathlib import Path

import torch

from orchestration.rundir import StageDir
from rlhf.collate import pack_text
from rlhf.config import Config
from rlhf.evaluation import (block_losses, bootstrap_ci, group_means, summed_log_ratio,
                             win_rate, win_rate_ci)
from rlhf.forward import token_logprobs
from rlhf.models import ScalarModel, load_policy, load_tokenizer
from rlhf.sampling import SampledChunk, sample_and_score
from rlhf.seeds import derive_seed

log = logging.getLogger(__name__)

TEMPERATURE = 1.0
CONFIDENCE = 0.95
SFT, PPO, PPO_PTX = "SFT", "PPO", "PPO-ptx"
SAMPLES, BLOCK_LOSSES = "samples.jsonl", "block_losses.json"  # in <run>/eval/


@dataclasses.dataclass
class HeldOut:
    prompts: list[str]          # each prompt `repeats` times in a row, one sample per row
    tasks: list | None          # synthetic Task per row (gold labeler); None for files
    blocks: torch.Tensor        # [N, L] packed pretraining text
    repeats: int = 1

    def by_prompt(self, per_row) -> list[float]:
        """Per-row values averaged over each prompt's rows: the unit intervals resample."""
        return group_means(per_row, self.repeats).tolist()


@dataclasses.dataclass
class PolicyEval:
    """Per-prompt and per-block numbers of one policy (lists align with HeldOut)."""
    responses: list[str]
    response_tokens: list[int]
    gold: list[float] | None
    rm: list[float] | None
    log_ratio: list[float]      # log pi(y|x) - log pi_sft(y|x) per sampled response
    block_losses: list[float]


def policies(cfg: Config) -> dict[str, StageDir]:
    """The trained policies present, by report name. `ppo/` holds PPO-ptx unless ptx is off."""
    root = cfg.output_dir
    found = {SFT: StageDir(root, "sft")}
    if cfg.ppo.ptx_coef > 0:
        found[PPO] = StageDir(root, "ppo_noptx")
        found[PPO_PTX] = StageDir(root, "ppo")
    else:
        found[PPO] = StageDir(root, "ppo")
    return {name: s for name, s in found.items() if s.is_done()}


def held_out(cfg: Config, tokenizer) -> HeldOut:
    """Test-split prompts and pretraining text (never seen in training, synthetic task)."""
    n_prompts, n_docs = cfg.eval.num_prompts, cfg.eval.num_pretrain_docs
    if cfg.data.source == "synthetic":
        from rlhf.synthetic import SyntheticSuite

        syn = cfg.data.synthetic
        suite = SyntheticSuite(syn.seed, syn.labeler_agreement, syn.demo_noise, syn.families)
        pairs = suite.prompts("test", n_prompts)
        tasks, prompts = [t for t, _ in pairs], [p for _, p in pairs]
        texts = [r.text for r in suite.pretraining_text("test", n_docs)]
    else:
        from orchestration import stage_data

        # The data's own test split (stable hash of each prompt / text), as the stages made it.
        stage_data.materialise(cfg)
        prompts = [r.prompt for r in stage_data.load(cfg, "prompts", "test")]
        texts = [r.text for r in stage_data.load(cfg, "pretrain", "test")]
        prompts, texts, tasks = prompts[:n_prompts], texts[:n_docs], None
    keep = [i for i, p in enumerate(prompts)
            if len(tokenizer(p, add_special_tokens=False)["input_ids"]) <= cfg.model.max_prompt_tokens]
    prompts = [prompts[i] for i in keep]
    tasks = [tasks[i] for i in keep] if tasks is not None else None
    if not prompts:
        raise ValueError("no held-out prompt fits model.max_prompt_tokens")
    r = cfg.eval.samples_per_prompt
    prompts = [p for p in prompts for _ in range(r)]
    tasks = [t for t in tasks for _ in range(r)] if tasks is not None else None
    # Blocks as long as the ptx term's, so the loss is the one ptx trains down.
    seq_len = cfg.ptx_block_tokens
    try:
        blocks = pack_text(tokenizer, texts, seq_len)
    except ValueError as e:
        raise ValueError(f"held-out pretraining text: {e}; raise eval.num_pretrain_docs") from None
    return HeldOut(prompts, tasks, blocks, r)


def _seed(cfg: Config, label: str) -> int:
    return derive_seed(cfg.run.seed, "eval", label)


def _device(cfg: Config) -> torch.device:
    if cfg.run.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.run.device)


def _dtype(cfg: Config) -> torch.dtype:
    return getattr(torch, cfg.model.dtype)


@contextlib.contextmanager
def _threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, min(n, old)))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _rm_inputs(rm_tok, tok, samples, prompts: list[str], responses: list[str]):
    """The sampled ids, or the same texts re-tokenized when the RM's tokenizer differs."""
    if rm_tok is None or rm_tok.get_vocab() == tok.get_vocab():
        return samples.input_ids, samples.attention_mask
    from rlhf.collate import pad_right

    seqs = [rm_tok(p, add_special_tokens=False)["input_ids"]
            + rm_tok(r, add_special_tokens=False)["input_ids"] + [rm_tok.eos_token_id]
            for p, r in zip(prompts, responses)]
    pad = rm_tok.pad_token_id if rm_tok.pad_token_id is not None else rm_tok.eos_token_id
    ids, mask, _ = pad_right(seqs, [[1] * len(s) for s in seqs], pad)
    return ids, mask


@dataclasses.dataclass
class _Scored:
    """One sampled response's numbers (PolicyEval's lists, per row)."""
    response: str
    tokens: int
    gold: float | None
    rm: float | None
    log_ratio: float


@torch.no_grad()
def evaluate_policy(model, sft_model, rm: ScalarModel | None, tok, data: HeldOut, *,
                    max_new_tokens: int, seed: int, batch_size: int, scorer=None,
                    rm_tok=None, block_batch_size: int = 16) -> PolicyEval:
    """Sample one response per row of `data` at T=1 and score it every way we have."""
    model.eval()
    device = next(model.parameters()).device

    def score(chunk: SampledChunk) -> list[_Scored]:
        s, responses = chunk.samples, chunk.responses
        prompts = data.prompts[chunk.rows.start:chunk.rows.stop]
        gold = [None] * len(responses)
        if scorer is not None:
            targets = data.tasks[chunk.rows.start:chunk.rows.stop] if data.tasks else prompts
            gold = [float(scorer(t, r)) for t, r in zip(targets, responses)]
        dev_ids, dev_mask = s.input_ids.to(device), s.attention_mask.to(device)
        # Both recomputed at T=1 (not the sampler's numbers), so SFT vs itself is exactly 0.
        lp = token_logprobs(model, dev_ids, dev_mask).cpu()
        ref = lp if model is sft_model else token_logprobs(sft_model, dev_ids, dev_mask).cpu()
        log_ratio = summed_log_ratio(lp, ref, s.action_mask).tolist()
        rm_scores = [None] * len(responses)
        if rm is not None:
            r_ids, r_mask = _rm_inputs(rm_tok, tok, s, prompts, responses)
            rm_device = next(rm.parameters()).device
            rm_scores = rm.score(r_ids.to(rm_device), r_mask.to(rm_device)).float().cpu().tolist()
        return [_Scored(*row) for row in zip(responses, s.action_mask.sum(1).tolist(), gold, rm_scores,
                                             log_ratio)]

    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in data.prompts]
    rows = sample_and_score(model, tok, ids, score, chunk_size=batch_size, max_new_tokens=max_new_tokens,
                            seed=seed, temperature=TEMPERATURE)
    return PolicyEval(responses=[r.response for r in rows], response_tokens=[r.tokens for r in rows],
                      gold=[r.gold for r in rows] if scorer is not None else None,
                      rm=[r.rm for r in rows] if rm is not None else None,
                      log_ratio=[r.log_ratio for r in rows],
                      block_losses=block_losses(model, data.blocks, block_batch_size).tolist())


def _mean(x) -> float:
    return float(sum(x) / len(x))


def _ci(values, seed: int) -> list[float]:
    return list(bootstrap_ci(values, CONFIDENCE, seed=seed))


def summarise(evals: dict[str, PolicyEval], sft_resample: PolicyEval, data: HeldOut) -> dict:
    """Per-policy table numbers, each with a bootstrap interval over prompts or blocks."""
    base, per_prompt = evals[SFT], data.by_prompt
    table = {}
    for name, e in evals.items():
        # SFT against its own fresh samples: the noise floor of a win rate.
        challenger = sft_resample if name == SFT else e
        row = {
            "kl_to_sft": _mean(e.log_ratio), "kl_to_sft_ci": _ci(per_prompt(e.log_ratio), 1),
            "lm_loss": _mean(e.block_losses), "lm_loss_ci": _ci(e.block_losses, 7),
            "lm_loss_delta_vs_sft": _mean([a - b for a, b in zip(e.block_losses, base.block_losses)]),
            "lm_loss_delta_vs_sft_ci": _ci([a - b for a, b in zip(e.block_losses, base.block_losses)], 2),
            "response_tokens_mean": _mean(e.response_tokens),
        }
        for key in ("gold", "rm"):
            mine, theirs = getattr(challenger, key), getattr(base, key)
            if mine is None:
                continue
            row[f"{key}_score_mean"] = _mean(getattr(e, key))
            row[f"{key}_score_ci"] = _ci(per_prompt(getattr(e, key)), 3)
            row[f"{key}_win_rate"] = win_rate(mine, theirs)
            row[f"{key}_win_rate_ci"] = list(win_rate_ci(mine, theirs, CONFIDENCE, seed=4,
                                                          group_size=data.repeats))
        if e.gold is not None:
            row["gold_exact"] = _mean([g == 1.0 for g in e.gold])
            if data.tasks:
                fams: dict[str, list[float]] = {}
                for t, g in zip(data.tasks, e.gold):
                    fams.setdefault(t.family, []).append(g)
                row["gold_by_family"] = {f: _mean(v) for f, v in sorted(fams.items())}
        key = "gold" if e.gold is not None else "rm" if e.rm is not None else None
        if key:
            row["win_rate"], row["win_rate_ci"] = row[f"{key}_win_rate"], row[f"{key}_win_rate_ci"]
            row["win_rate_judge"] = key
        table[name] = row
    return table


def ptx_effect(evals: dict[str, PolicyEval], data: HeldOut) -> dict | None:
    """PPO-ptx minus PPO, paired on the same blocks / prompts: what the ptx term bought."""
    if PPO not in evals or PPO_PTX not in evals:
        return None
    a, b = evals[PPO_PTX], evals[PPO]
    diff = [x - y for x, y in zip(a.block_losses, b.block_losses)]
    out = {"lm_loss_ptx_minus_ppo": _mean(diff), "lm_loss_ptx_minus_ppo_ci": _ci(diff, 5)}
    judge = "gold" if a.gold is not None else "rm" if a.rm is not None else None
    if judge:
        out["judge"] = judge
        out["win_rate_ptx_vs_ppo"] = win_rate(getattr(a, judge), getattr(b, judge))
        out["win_rate_ptx_vs_ppo_ci"] = list(win_rate_ci(getattr(a, judge), getattr(b, judge), seed=6,
                                                         group_size=data.repeats))
    return out


def _write_samples(path: Path, data: HeldOut, evals: dict[str, PolicyEval]) -> None:
    """Every sampled row of every policy, and (beside it) each policy's loss on each held-out
    text block: what paired comparisons across runs (`instructray reproduce`) resample."""
    blocks = {name: e.block_losses for name, e in evals.items()}
    (path.parent / BLOCK_LOSSES).write_text(json.dumps(blocks))
    with open(path, "w") as f:
        for i, prompt in enumerate(data.prompts):
            rec = {"prompt": prompt}
            for name, e in evals.items():
                rec[name] = {"response": e.responses[i],
                             "gold": e.gold[i] if e.gold is not None else None,
                             "rm": e.rm[i] if e.rm is not None else None}
            f.write(json.dumps(rec) + "\n")


def run_eval(cfg: Config) -> dict:
    """Evaluate every trained policy; write eval/results.json and eval/samples.jsonl."""
    found = policies(cfg)
    if SFT not in found:
        raise FileNotFoundError(f"{cfg.output_dir / 'sft' / 'final'}: no finished SFT model to compare against")
    device, dtype = _device(cfg), _dtype(cfg)
    tok = load_tokenizer(found[SFT].final)
    data = held_out(cfg, tok)
    scorer = None
    if cfg.data.source == "synthetic":
        from rlhf.synthetic import SyntheticSuite

        scorer = SyntheticSuite(cfg.data.synthetic.seed).score  # gold_score needs no labeler noise
    rm_stage, rm, rm_tok = StageDir(cfg.output_dir, "rm"), None, None
    if rm_stage.is_done():
        rm = ScalarModel.from_pretrained(rm_stage.final, dtype=dtype).to(device).eval()
        if (rm_stage.final / "tokenizer_config.json").exists():
            rm_tok = load_tokenizer(rm_stage.final)
    m = cfg.model
    width = m.max_prompt_tokens + m.max_response_tokens
    budget = cfg.ppo.generation_token_budget
    kwargs = dict(max_new_tokens=m.max_response_tokens, scorer=scorer, rm_tok=rm_tok,
                  batch_size=max(1, min(len(data.prompts), budget // width)),
                  block_batch_size=max(1, budget // data.blocks.shape[1]))
    sft_model = load_policy(found[SFT].final, dtype=dtype).to(device).eval()
    evals: dict[str, PolicyEval] = {}
    for name, stage in found.items():
        log.info("evaluating %s (%s) on %d prompts, %d text blocks", name, stage.final,
                 len(data.prompts), data.blocks.shape[0])
        model = sft_model if name == SFT else load_policy(stage.final, dtype=dtype).to(device).eval()
        evals[name] = evaluate_policy(model, sft_model, rm, tok, data, seed=_seed(cfg, name), **kwargs)
        del model
    sft_resample = evaluate_policy(sft_model, sft_model, rm, tok, data,
                                   seed=_seed(cfg, "SFT/resample"), **kwargs)
    results = {
        "settings": {
            "num_prompts": len(data.prompts) // data.repeats, "samples_per_prompt": data.repeats,
            "num_blocks": int(data.blocks.shape[0]),
            "block_len": int(data.blocks.shape[1]), "temperature": TEMPERATURE,
            "max_response_tokens": m.max_response_tokens, "seed": cfg.run.seed,
            "confidence": CONFIDENCE, "judge": "gold" if scorer else "rm" if rm is not None else None,
            "data_source": cfg.data.source,
            "paths": {name: str(s.final) for name, s in found.items()},
        },
        "policies": summarise(evals, sft_resample, data),
        "ptx_effect": ptx_effect(evals, data),
    }
    if cfg.eval.truthfulqa:
        from orchestration.stages import truthfulqa  # lm-eval is an optional extra

        results["truthfulqa"] = truthfulqa.evaluate(cfg, found, device, dtype)
    out_dir = cfg.output_dir / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_samples(out_dir / SAMPLES, data, evals)
    tmp = out_dir / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(out_dir / "results.json")
    return results


def main(cfg: Config, resume: bool = False) -> dict:
    """Evaluate (unless resuming with results already written), write the report, print its table.

    Returns a pipeline-step summary: where results and report are, and the table.
    """
    from orchestration.report import write_report

    results_file = cfg.output_dir / "eval" / "results.json"
    if not (resume and results_file.exists()):
        with _threads(min(4, os.cpu_count() or 1)):
            run_eval(cfg)
    table = write_report(cfg.output_dir)
    print(table, flush=True)
    return {"results": str(results_file), "report": str(cfg.output_dir / "report.md"), "table": table}
