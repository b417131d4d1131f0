"""The baseline: PPO-ptx as one plain single-process loop, the program a user writes without us.

Same models and the same rlhf/ math as the Ray system (build_experience, policy,
value and ptx losses, EMA, LR schedule), but: HF `model.generate` for sampling,
the four scoring passes one after another, policy then critic updates one
after another, all in one process using torch's default threads (every core).
No weight sync: the sampler is the trained model.

    .venv/bin/python bench/plain_loop.py [--preset tiny] [--iterations 2]

runs it alone (bench/ppo_iteration.py runs it beside the Ray system).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rlhf.collate import lm_batch  # noqa: E402
from rlhf.config import Config  # noqa: E402
from rlhf.ema import EMA  # noqa: E402
from rlhf.experience import Rollout, build_experience  # noqa: E402
from rlhf.forward import policy_logits, token_logprobs, token_values  # noqa: E402
from rlhf.losses import policy_loss, ptx_lm_loss, value_loss  # noqa: E402
from rlhf.models import ScalarModel, load_policy  # noqa: E402
from rlhf.sampling import left_pad  # noqa: E402
from rlhf.schedules import lambda_lr, warmup_then_constant  # noqa: E402
from rlhf.train_state import make_optimizer  # noqa: E402

CHUNK = 64  # rows per scoring forward pass, as the Ray scorers use


def _adam(params, lr: float, cfg: Config) -> torch.optim.Optimizer:
    return make_optimizer(params, lr, cfg.optimizer)  # the learners' own (fused): compare the system, not Adam


def response_masks(sequences: torch.Tensor, prompt_width: int, eos_id: int | None) -> torch.Tensor:
    """1 on response tokens up to and including the first EOS (generate pads after it)."""
    resp = sequences[:, prompt_width:]
    if eos_id is None:
        return torch.ones_like(resp)
    ended_before = torch.cumsum((resp == eos_id).long(), dim=1) - (resp == eos_id).long()
    return (ended_before == 0).long()


class PlainPPO:
    """Policy, reference, RM and critic in this process; `iteration()` is one PPO-ptx step."""

    def __init__(self, cfg: Config, policy_dir: Path, rm_dir: Path, tokenizer, ptx_coef: float) -> None:
        p = self.p = cfg.ppo
        self.cfg, self.tok, self.ptx_coef = cfg, tokenizer, ptx_coef
        self.policy = load_policy(policy_dir).eval()  # eval: no dropout, as our learners
        self.ref = load_policy(policy_dir).eval()
        self.rm = ScalarModel.from_pretrained(rm_dir).eval()
        self.critic = ScalarModel.from_pretrained(rm_dir).eval()
        self.opt = _adam(self.policy.parameters(), p.lr, cfg)
        self.critic_opt = _adam(self.critic.parameters(), p.critic_lr, cfg)
        kw = {"warmup_iters": p.warmup_iterations, "start_fraction": p.warmup_start_fraction}
        self.sched = [lambda_lr(self.opt, warmup_then_constant, **kw),
                      lambda_lr(self.critic_opt, warmup_then_constant, **kw)]
        self.ema = EMA(self.policy, decay=p.ema_decay)
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    @torch.no_grad()
    def generate(self, prompts: list[str], seed: int) -> Rollout:
        ids = [self.tok(t, add_special_tokens=False)["input_ids"] for t in prompts]
        ids, mask = left_pad(ids, self.tok.pad_token_id)
        torch.manual_seed(seed)
        out = self.policy.generate(ids, attention_mask=mask, do_sample=True, temperature=self.p.temperature,
                                   top_k=0, top_p=self.p.top_p, max_new_tokens=self.cfg.model.max_response_tokens,
                                   pad_token_id=self.tok.pad_token_id)
        eos = self.policy.generation_config.eos_token_id
        resp = response_masks(out, ids.shape[1], eos)
        action = torch.cat([torch.zeros_like(mask), resp], dim=1)
        return Rollout(input_ids=out, attention_mask=torch.cat([mask, resp], dim=1), action_mask=action,
                       sampler_logprobs=torch.zeros(out.shape), prompts=list(prompts), weight_version=0)

    @torch.no_grad()
    def score(self, r: Rollout):
        def chunks(fn, model):
            return torch.cat([fn(model, i, m) for i, m in zip(r.input_ids.split(CHUNK),
                                                               r.attention_mask.split(CHUNK))])
        old = chunks(token_logprobs, self.policy)
        ref = chunks(token_logprobs, self.ref)
        values = chunks(token_values, self.critic)
        rm = chunks(lambda m, i, a: m.score(i, a), self.rm)
        mask = r.action_mask.float()
        # the plain loop has no separate sampler: its logprobs are the policy's own
        r = r.replace(sampler_logprobs=old * mask)
        return build_experience(r, old * mask, ref * mask, values, rm, self.p.kl_coef, self.p.gamma, self.p.lam)

    def learn(self, exp, ptx_stream, k: int) -> dict:
        order = torch.randperm(len(exp), generator=torch.Generator().manual_seed(k))
        stats = []
        for mb in exp.select(order).split(self.p.minibatch_size):
            self.opt.zero_grad(set_to_none=True)
            logp = token_logprobs(self.policy, mb.input_ids, mb.attention_mask)
            loss, s = policy_loss(logp, mb.old_logprobs, mb.advantages, mb.action_mask, clip=self.p.clip_ratio)
            loss.backward()
            if self.ptx_coef > 0 and self.p.ptx_ratio > 0:
                with self.phase("ptx"):
                    b = lm_batch(ptx_stream.take_blocks(len(mb) * self.p.ptx_ratio))
                    lm = ptx_lm_loss(policy_logits(self.policy, b.input_ids, b.attention_mask),
                                     b.input_ids, b.loss_mask)
                    (self.ptx_coef * lm).backward()  # same .grad buffers: one joint step
                s["ptx_loss"] = float(lm.detach())
            self.opt.step()
            self.ema.update(self.policy)
            self.critic_opt.zero_grad(set_to_none=True)
            v = token_values(self.critic, mb.input_ids, mb.attention_mask)
            vloss, vs = value_loss(v, mb.old_values, mb.returns, mb.action_mask, clip=self.p.value_clip)
            vloss.backward()
            self.critic_opt.step()
            stats.append(s | vs | {"loss": float(loss.detach()), "value_loss": float(vloss.detach())})
        for sched in self.sched:
            sched.step()
        return {k: sum(s[k] for s in stats) / len(stats) for k in stats[0]}

    def iteration(self, prompts: list[str], ptx_stream, k: int) -> dict:
        """One PPO-ptx iteration; returns its stats and seconds per phase (ptx is inside learn)."""
        self.seconds = {}
        with self.phase("generate"):
            rollout = self.generate(prompts, seed=k)
        with self.phase("score"):
            exp, stats = self.score(rollout)
        with self.phase("learn"):
            stats |= self.learn(exp, ptx_stream, k)
        tokens = int(rollout.attention_mask.sum())
        seconds = {f"seconds_{n}": v for n, v in self.seconds.items()}
        total = sum(v for n, v in seconds.items() if n != "seconds_ptx")
        return stats | seconds | {"seconds_sync": 0.0, "seconds_total": total, "episodes": len(prompts),
                                  "tokens": tokens, "generated_tokens": int(rollout.action_mask.sum())}


def main(argv: list[str] | None = None) -> int:
    from bench.common import build_models, ptx_blocks, synthetic_prompts
    from orchestration.ppo.streams import BlockStream, Stream
    from rlhf.config import load_config

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="config overrides, key.sub=value")
    args = parser.parse_args(argv)
    cfg = load_config(args.preset, args.overrides)
    t = cfg.model.tiny
    with tempfile.TemporaryDirectory() as tmp:
        models = build_models(Path(tmp), t.vocab_size, t.n_layer, t.n_head, t.n_embd,
                              t.n_positions or cfg.model.context_length, seed=cfg.run.seed)
        prompts = Stream(synthetic_prompts(models.tokenizer, 4 * cfg.ppo.batch_size, cfg.model.max_prompt_tokens),
                         seed=cfg.run.seed)
        ptx = BlockStream(ptx_blocks(models.tokenizer, cfg.ppo.ptx_seq_len or cfg.model.context_length),
                          seed=cfg.run.seed + 1)
        loop = PlainPPO(cfg, models.policy, models.reward, models.tokenizer, cfg.ppo.ptx_coef)
        for k in range(args.iterations):
            row = loop.iteration(prompts.take(cfg.ppo.batch_size), ptx, k)
            print({n: round(v, 3) for n, v in row.items() if n.startswith("seconds") or n == "episodes"},
                  f"episodes/s {row['episodes'] / row['seconds_total']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
