"""Generation: tokens/s of our hf engine vs `model.generate(do_sample=True)`.

    .venv/bin/python bench/generation.py [--quick] [--threads 1]

Same untrained model, same prompts (synthetic suite, left-padded), same batch,
T=1 with no top-k/top-p on both sides, and EOS made unreachable
(bench.common.disable_eos) so both sides generate exactly batch x max_new_tokens
tokens; the count is checked. One thread, as a generator actor runs. Each side
is timed best-of-N after a warm-up call, the two sides taking turns call by call.
One more call of each under torch's profiler gives the time both must spend in
the model's matrix products and attention, and so the most any engine could gain
over model.generate (`bound`). Writes bench/results/generation.json.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import best_of_alternating, build_models, print_table, synthetic_prompts, write_results  # noqa: E402

# (preset, model shape, max_new_tokens, batches): the tiny and small presets' models.
CASES = [
    ("tiny", dict(vocab_size=1024, n_layer=2, n_head=4, n_embd=128, n_positions=128), 32, [64, 256]),
    ("small", dict(vocab_size=1024, n_layer=8, n_head=8, n_embd=512, n_positions=128), 64, [32, 128]),
]
QUICK = [
    ("tiny", dict(vocab_size=1024, n_layer=2, n_head=4, n_embd=128, n_positions=128), 16, [64]),
    ("small", dict(vocab_size=1024, n_layer=8, n_head=8, n_embd=512, n_positions=128), 16, [16]),
]


def hf_generate(model, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int, pad_id: int) -> torch.Tensor:
    """What a user writes: plain sampling at T=1 (top_k=0 turns off the default top-50)."""
    return model.generate(ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                          max_new_tokens=new_tokens, pad_token_id=pad_id)


# The model's matrix products and attention over the cache: work any engine sampling this
# model at this batch does, whatever its loop (the fused attention kernel or two matmuls).
SHARED_OPS = ("aten::addmm", "aten::mm", "aten::bmm", "aten::_scaled_dot_product_flash_attention_for_cpu")


def op_profile(fn) -> dict[str, float]:
    """CPU seconds per torch op over one call, largest first: where the time goes."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return {e.key: e.self_cpu_time_total / 1e6 for e in events}


def run_case(name: str, shape: dict, new_tokens: int, batch: int, repeats: int, folder: Path) -> dict:
    from actors.engines.hf_engine import HFEngine
    from rlhf.models import load_policy
    from rlhf.sampling import left_pad

    models = build_models(folder / name, **shape)
    tok = models.tokenizer
    prompts = [tok(p, add_special_tokens=False)["input_ids"]
               for p in synthetic_prompts(tok, batch, max_tokens=shape["n_positions"] - new_tokens)]
    engine = HFEngine(str(models.policy), seed=0, device="cpu")
    model = load_policy(models.policy).eval()
    ids, mask = left_pad(prompts, tok.pad_token_id)

    ours = lambda: engine.generate(prompts, new_tokens, temperature=1.0, top_p=1.0)  # noqa: E731
    theirs = lambda: hf_generate(model, ids, mask, new_tokens, tok.pad_token_id)  # noqa: E731
    ours(), theirs()  # warm-up: first-call allocations and lazy imports
    timed = best_of_alternating({"ours": ours, "theirs": theirs}, repeats)
    (t_ours, s), (t_hf, out) = timed["ours"], timed["theirs"]
    n_ours, n_hf = int(s.action_mask.sum()), int((out.shape[1] - ids.shape[1]) * out.shape[0])
    if n_ours != n_hf or n_ours != batch * new_tokens:
        raise RuntimeError(f"unequal work: ours {n_ours} tokens, model.generate {n_hf}")
    row = {"preset": name, "params_M": models.params / 1e6, "batch": batch, "prompt_width": ids.shape[1],
           "new_tokens": new_tokens, "tokens": n_ours,
           "ours_s": t_ours, "hf_generate_s": t_hf,
           "ours_tok_s": n_ours / t_ours, "hf_generate_tok_s": n_hf / t_hf, "speedup": t_hf / t_ours}
    mine, hf = op_profile(ours), op_profile(theirs)
    top = list(dict.fromkeys(list(mine)[:6] + list(hf)[:6]))
    row["profile"] = [{"op": op, "ours": mine.get(op, 0.0), "hf_generate": hf.get(op, 0.0)} for op in top]
    # The least either side spent on the shared work bounds what any engine can gain over
    # model.generate: all of the rest removed, this much is left.
    shared = min(sum(p.get(op, 0.0) for op in SHARED_OPS) for p in (mine, hf))
    row["shared_s"], row["bound"] = shared, t_hf / shared
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: short responses, small batches")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, shape, new_tokens, batches in (QUICK if args.quick else CASES):
            for batch in batches:
                rows.append(run_case(name, shape, new_tokens, batch, 1 if args.quick else args.repeats, Path(tmp)))
                print_table("generation (so far)", rows[-1:], [k for k in rows[-1] if k != "profile"])
    cols = ["preset", "params_M", "batch", "new_tokens", "tokens", "ours_tok_s", "hf_generate_tok_s", "speedup",
            "bound"]
    print_table(f"generation, {args.threads} thread(s): our hf engine vs model.generate", rows, cols)
    print("bound: model.generate's time over the least either side spent in matrix products and attention")
    for r in rows:
        print_table(f"CPU seconds by op in one call, {r['preset']} batch {r['batch']} (each side's top ops)",
                    r["profile"], ["op", "ours", "hf_generate"])
    write_results("generation", {"threads": args.threads, "rows": rows}, quick=args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
