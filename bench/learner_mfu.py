"""Learner MFU: model FLOPs of the PolicyLearner's train step against this machine's matmul peak.

    .venv/bin/python bench/learner_mfu.py [--quick] [--preset small] [--threads 1]

MFU = 6 * params * tokens / step seconds / peak, where tokens counts every token
the step runs forward and backward (the PPO rows and the ptx rows) and peak is a
large fp32 torch.matmul measured in the same run on the same thread count (one
thread: a learner actor's). The step is `PolicyLearner.train_minibatch` (PPO
loss backward, ptx loss backward into the same gradients, bucketed gradient
capture, Adam, EMA), at the preset's per-learner shard and at a whole minibatch
on one learner; its time is split into PPO forward+backward, ptx
forward+backward and the rest (optimizer, EMA, gradient buckets) by timing those
parts on their own. Writes bench/results/learner_mfu.json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import build_models, print_table, ptx_blocks, synthetic_prompts, write_results  # noqa: E402


def matmul_peak(threads: int, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the best of `repeats` n x n fp32 matmuls into a preallocated output."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    torch.matmul(a, b, out=out)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def make_experience(learner, models, cfg, rows: int):
    """A scored batch for the learner: real sampled sequences, arbitrary advantages (FLOPs do not care)."""
    from rlhf.experience import Experience
    from rlhf.sampling import sample

    tok = models.tokenizer
    prompts = [tok(p, add_special_tokens=False)["input_ids"]
               for p in synthetic_prompts(tok, rows, cfg.model.max_prompt_tokens)]
    s = sample(learner.model, prompts, cfg.model.max_response_tokens, learner.model.config.eos_token_id,
               tok.pad_token_id, generator=torch.Generator().manual_seed(0))
    old = learner.logprobs(s.input_ids, s.attention_mask) * s.action_mask
    g = torch.Generator().manual_seed(1)
    adv = torch.randn(s.input_ids.shape, generator=g) * s.action_mask
    return Experience(input_ids=s.input_ids, attention_mask=s.attention_mask, action_mask=s.action_mask,
                      old_logprobs=old, ref_logprobs=old, old_values=torch.zeros(old.shape), advantages=adv,
                      returns=adv, weight_version=0)


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(learner, exp, ptx, coef: float, repeats: int) -> dict:
    from rlhf.forward import policy_logits, token_logprobs
    from rlhf.losses import policy_loss, ptx_lm_loss

    model = learner.model

    def ppo_fwd_bwd():
        logp, _ = token_logprobs(model, exp.input_ids, exp.attention_mask, with_entropy=True)
        loss, _ = policy_loss(logp, exp.old_logprobs, exp.advantages, exp.action_mask)
        loss.backward()
        model.zero_grad(set_to_none=True)

    def ptx_fwd_bwd():
        lm = ptx_lm_loss(policy_logits(model, ptx.input_ids, ptx.attention_mask), ptx.input_ids, ptx.loss_mask)
        (coef * lm).backward()
        model.zero_grad(set_to_none=True)

    step = median_time(lambda: learner.train_minibatch(exp, ptx, ptx_coef=coef), repeats)
    ppo = median_time(ppo_fwd_bwd, repeats)
    lm = median_time(ptx_fwd_bwd, repeats)
    params = sum(p.numel() for p in model.parameters())
    ppo_tokens, ptx_tokens = int(exp.attention_mask.numel()), int(ptx.input_ids.numel())
    return {"ppo_rows": len(exp), "ptx_rows": len(ptx), "tokens": ppo_tokens + ptx_tokens, "step_s": step,
            "ppo_fwd_bwd_s": ppo, "ptx_fwd_bwd_s": lm, "rest_s": max(step - ppo - lm, 0.0),
            "model_flops": 6 * params * (ppo_tokens + ptx_tokens),
            "ppo_part_flops": 6 * params * ppo_tokens, "ptx_part_flops": 6 * params * ptx_tokens}


def main(argv: list[str] | None = None) -> int:
    from actors.policy_learner import PolicyLearner
    from rlhf.collate import lm_batch
    from rlhf.config import load_config

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer repeats, short responses")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    overrides = ["model.max_response_tokens=16"] if args.quick else []
    cfg = load_config(args.preset, overrides)
    p, t = cfg.ppo, cfg.model.tiny
    repeats = 2 if args.quick else args.repeats
    peak = matmul_peak(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        models = build_models(Path(tmp), t.vocab_size, t.n_layer, t.n_head, t.n_embd,
                              t.n_positions or cfg.model.context_length, seed=cfg.run.seed)
        learner = PolicyLearner(str(models.policy), ppo=p, optimizer=cfg.optimizer, num_threads=args.threads,
                                device="cpu")
        blocks = ptx_blocks(models.tokenizer, p.ptx_seq_len or cfg.model.context_length)
        for label, rows_per_step in (("per-learner shard", p.minibatch_size // p.num_learners),
                                     ("whole minibatch", p.minibatch_size)):
            exp = make_experience(learner, models, cfg, rows_per_step)
            ptx = lm_batch(blocks[: rows_per_step * p.ptx_ratio])
            r = measure(learner, exp, ptx, p.ptx_coef, repeats)
            r |= {"shape": label, "params_M": models.params / 1e6,
                  "mfu": r["model_flops"] / r["step_s"] / peak,
                  "ppo_part_mfu": r["ppo_part_flops"] / r["ppo_fwd_bwd_s"] / peak,
                  "ptx_part_mfu": r["ptx_part_flops"] / r["ptx_fwd_bwd_s"] / peak,
                  "achieved_GFLOP_s": r["model_flops"] / r["step_s"] / 1e9}
            rows.append(r)
    peak_2 = matmul_peak(2) if args.threads == 1 else None
    print(f"\npeak fp32 matmul, {args.threads} thread(s): {peak / 1e9:.1f} GFLOP/s"
          + (f" (2 threads: {peak_2 / 1e9:.1f})" if peak_2 else ""))
    print_table(f"learner MFU, {args.preset} preset ({rows[0]['params_M']:.1f}M parameters, "
                f"{args.threads} thread(s))", rows,
                ["shape", "ppo_rows", "ptx_rows", "tokens", "step_s", "achieved_GFLOP_s", "mfu",
                 "ppo_fwd_bwd_s", "ptx_fwd_bwd_s", "rest_s", "ppo_part_mfu", "ptx_part_mfu"])
    write_results("learner_mfu", {"preset": args.preset, "threads": args.threads, "peak_flops": peak,
                                  "peak_flops_2_threads": peak_2, "rows": rows}, quick=args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
