"""TRL's PPOTrainer on given models and prompts; run by bench/peer_trl.py inside its own venv.

    python bench/peer_trl_run.py SPEC.json OUT.json

Needs only torch, transformers, datasets and trl (0.24, with its top-level PPOTrainer).
SPEC: the policy directory, prompt token ids, batch, minibatch, response length,
iterations and threads. The policy's config makes EOS unreachable, so every
response has exactly the response length, as on our side. OUT: seconds per iteration
after the first (a warm-up), the episodes per second they give, and those iterations'
mean seconds by phase: generate (`batch_generation`), score (from there to the first training
forward: the reference, value and reward passes, advantages) and learn (the rest). With SPEC's
"profile" true, instead the share of the whole `train()` (warm-up included) spent in
matrix products (self time of aten mm/addmm/bmm/baddbmm and CPU attention kernels):
any PPO doing the same passes on the same hardware must spend that time too.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time


def main(spec_file: str, out_file: str) -> int:
    spec = json.loads(open(spec_file).read())
    import torch
    torch.set_num_threads(spec["threads"])
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import PPOConfig, PPOTrainer

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.marks: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):  # one PPO iteration (rollout + update)
            self.marks.append(time.perf_counter())

    path, batch = spec["policy"], spec["batch_size"]
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    policy, ref = (AutoModelForCausalLM.from_pretrained(path) for _ in range(2))
    # Value and reward models: the policy's body with a scalar head, as our critic and RM are.
    value, reward = (AutoModelForSequenceClassification.from_pretrained(path, num_labels=1) for _ in range(2))
    for m in (value, reward):
        m.config.pad_token_id = tok.pad_token_id
    data = Dataset.from_dict({"input_ids": spec["prompt_ids"]})
    iterations = spec["iterations"] + 1  # the first is a warm-up
    with tempfile.TemporaryDirectory() as out:
        args = PPOConfig(
            output_dir=out, per_device_train_batch_size=batch, gradient_accumulation_steps=1,
            num_mini_batches=batch // spec["minibatch_size"], num_ppo_epochs=1,
            response_length=spec["response_tokens"], total_episodes=batch * iterations,
            stop_token=None, missing_eos_penalty=None, kl_coef=spec["kl_coef"], learning_rate=spec["lr"],
            temperature=1.0, num_sample_generations=0, report_to=[], save_strategy="no",
            logging_steps=10 ** 6, use_cpu=True, seed=0, dataloader_drop_last=True)
        clock = Clock()
        trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                             train_dataset=data, value_model=value, eval_dataset=data, callbacks=[clock])
        if spec.get("profile"):
            return _profile(trainer, out_file)
        phases = PhaseClock()
        trainer.train()
    steps = [b - a for a, b in zip(clock.marks, clock.marks[1:])][1:]
    result = {"trl_version": trl.__version__, "s_per_iteration": sum(steps) / len(steps),
              "iterations": len(steps), "episodes": batch,
              "rollout_forward_batch": args.local_rollout_forward_batch_size}
    result["episodes_per_s"] = batch / result["s_per_iteration"]
    result |= phases.means(clock.marks)
    open(out_file, "w").write(json.dumps(result))
    return 0


class PhaseClock:
    """Phase marks inside TRL's `train()`, through the two module functions it calls by name:
    `batch_generation` (the rollout) and `forward` (the reference pass, then the training steps)."""

    def __init__(self) -> None:
        import torch
        import trl.trainer.ppo_trainer as ppo

        self.gen_start: list[float] = []
        self.gen_end: list[float] = []
        self.learn_start: list[float] = []
        generate, forward = ppo.batch_generation, ppo.forward

        def timed_generate(*args, **kwargs):
            self.gen_start.append(time.perf_counter())
            out = generate(*args, **kwargs)
            self.gen_end.append(time.perf_counter())
            return out

        def marked_forward(*args, **kwargs):
            if torch.is_grad_enabled() and len(self.learn_start) < len(self.gen_end):
                self.learn_start.append(time.perf_counter())  # this iteration's first training forward
            return forward(*args, **kwargs)

        ppo.batch_generation, ppo.forward = timed_generate, marked_forward

    def means(self, step_ends: list[float]) -> dict:
        """Mean seconds per phase over the iterations after the warm-up."""
        rows = list(zip(self.gen_start, self.gen_end, self.learn_start, step_ends[1:]))[1:]
        n = max(len(rows), 1)
        return {"generate_s": sum(b - a for a, b, _, _ in rows) / n, "score_s": sum(c - b for _, b, c, _ in rows) / n,
                "learn_s": sum(d - c for _, _, c, d in rows) / n}


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def _profile(trainer, out_file: str) -> int:
    import torch

    start = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        trainer.train()
    wall = time.perf_counter() - start
    matmul_us = sum(e.self_cpu_time_total for e in prof.key_averages()
                    if e.key in MATMUL_OPS or e.key.startswith("aten::_scaled_dot_product_flash_attention"))
    result = {"profiled_wall_s": wall, "matmul_s": matmul_us / 1e6, "matmul_share": matmul_us / 1e6 / wall}
    open(out_file, "w").write(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:3]))
