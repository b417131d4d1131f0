"""PPO learners normalise by the minibatch's global token count: 2 ranks (gloo, Ray
actors) make the step 1 rank makes on the whole minibatch, for the policy (PPO + ptx)
and the critic, even when the ranks' shards hold very different numbers of tokens.

Float64 models, so the comparison holds to 1e-9 (only summation order differs between
1 and 2 ranks). Adam's eps is set to 1: its first step is then lr * g / (|g| + 1),
close to lr * g. At the usual eps 1e-8 the first step is ~lr * sign(g), which would
hide a rescaled gradient and make the comparison say little.
"""
import pytest
import ray
import torch

from actors.critic import CriticLearner
from actors.group import WorkerGroup
from actors.policy_learner import PolicyLearner
from rlhf.collate import LMBatch, lm_batch, pack_text
from rlhf.config import OptimizerConfig, PPOConfig
from rlhf.experience import Experience
from rlhf.sharding import TrainLayout

pytestmark = pytest.mark.slow

TEXTS = ["the red fox runs over the hill", "a blue bird sings at dawn", "one two three four five six"] * 20
TOL = 1e-9
LR, EPS = 0.1, 1.0
CPU = 0.25


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, actor_models, ragged_batch):
    d = actor_models(tmp_path_factory.mktemp("tiny_token_mean"), TEXTS)
    return d | {"batch": ragged_batch(d["tok"])}


def _ppo() -> PPOConfig:
    return PPOConfig(lr=LR, critic_lr=LR, warmup_iterations=0)


def _opt() -> OptimizerConfig:
    return OptimizerConfig(eps=EPS)


def _experience(ids, attn, act, old_logprobs, old_values) -> Experience:
    g = torch.Generator().manual_seed(1)
    m = act.double()
    return Experience(input_ids=ids, attention_mask=attn, action_mask=act,
                      old_logprobs=old_logprobs * m, ref_logprobs=old_logprobs * m,
                      old_values=old_values * m, advantages=torch.randn(m.shape, generator=g, dtype=torch.float64) * m,
                      returns=(old_values + torch.randn(m.shape, generator=g, dtype=torch.float64)) * m,
                      weight_version=0)


def _ptx(tok) -> LMBatch:
    """4 packed rows; rank 0's two count 3 targets each, rank 1's all 11."""
    b = lm_batch(pack_text(tok, TEXTS, seq_len=12)).select(slice(0, 4))
    loss_mask = b.loss_mask.clone()
    loss_mask[:2, 4:] = 0
    return b.replace(loss_mask=loss_mask)


def _params(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _grads(learner) -> dict[str, torch.Tensor]:
    """The gradient the learner's last step used (its buffers after the all-reduce)."""
    return {n: v.clone() for n, v in learner.grads.views.items()}


def _adam_first_step(p0, g):
    # Bias-corrected first Adam(W) step without weight decay: m_hat = g, v_hat = g^2.
    return {n: p0[n] - LR * g[n] / (g[n].abs() + EPS) for n in p0}


def _max_diff(a, b) -> float:
    return max(float((a[n] - b[n]).abs().max()) for n in a)


def _check(one, one_params, two_params, halves, p0):
    """one: the 1-rank learner after its step; two_params: both ranks' parameters after
    theirs; halves: 1-rank learners stepped on each shard alone (for the old rule)."""
    for params in two_params:
        assert _max_diff(params, one_params) < TOL
    # The Adam formula reproduces the real step, so it can stand in for the old rule's step.
    assert _max_diff(_adam_first_step(p0, _grads(one)), one_params) < TOL
    ga, gb = (_grads(h) for h in halves)
    per_rank_mean = _adam_first_step(p0, {n: (ga[n] + gb[n]) / 2 for n in ga})
    # Averaging the ranks' own token means (the old rule) lands far outside the tolerance.
    assert _max_diff(per_rank_mean, one_params) > 1e4 * TOL


@pytest.fixture(scope="module")
def groups(ray_local, dirs):
    learners = WorkerGroup(PolicyLearner, 2, dirs["policy"], _ppo(), _opt(), num_cpus=CPU,
                           num_threads=1, device="cpu", layout=TrainLayout(dtype="float64"))
    critics = WorkerGroup(CriticLearner, 2, dirs["rm"], _ppo(), _opt(), num_cpus=CPU,
                          num_threads=1, device="cpu", layout=TrainLayout(dtype="float64"))
    yield learners, critics
    learners.shutdown()
    critics.shutdown()


def _local(cls, path):
    return cls(path, _ppo(), _opt(), num_threads=1, device="cpu", layout=TrainLayout(dtype="float64"))


def test_policy_step_on_two_ranks_equals_one_rank(dirs, groups):
    tok, (learners, _) = dirs["tok"], groups
    one = _local(PolicyLearner, dirs["policy"])
    p0 = _params(one.model)
    ids, attn, act = dirs["batch"]
    exp = _experience(ids, attn, act, one.logprobs(ids, attn), torch.zeros(ids.shape, dtype=torch.float64))
    ptx = _ptx(tok)
    halves = [_local(PolicyLearner, dirs["policy"]) for _ in range(2)]
    for h, e, b in zip(halves, exp.chunk(2), ptx.chunk(2)):
        h.train_minibatch(e, b, ptx_coef=1.0)

    stats_one = one.train_minibatch(exp, ptx, ptx_coef=1.0)
    stats_two = ray.get(learners.call_sharded("train_minibatch", exp.chunk(2), ptx.chunk(2), ptx_coef=1.0))
    assert stats_one["ptx_grad_norm"] > 0 and stats_one["skipped"] == 0
    assert all(abs(s["grad_norm"] - stats_one["grad_norm"]) < TOL * stats_one["grad_norm"] for s in stats_two)
    two_params = [_params(m) for m in ray.get(learners.call_all("trained_module"))]
    _check(one, _params(one.model), two_params, halves, p0)


def test_critic_step_on_two_ranks_equals_one_rank(dirs, groups):
    tok, (_, critics) = dirs["tok"], groups
    one = _local(CriticLearner, dirs["rm"])
    p0 = _params(one.model)
    ids, attn, act = dirs["batch"]
    exp = _experience(ids, attn, act, torch.zeros(ids.shape, dtype=torch.float64), one.values(ids, attn))
    halves = [_local(CriticLearner, dirs["rm"]) for _ in range(2)]
    for h, e in zip(halves, exp.chunk(2)):
        h.train_minibatch(e)

    stats_one = one.train_minibatch(exp)
    stats_two = ray.get(critics.call_sharded("train_minibatch", exp.chunk(2)))
    assert all(abs(s["grad_norm"] - stats_one["grad_norm"]) < TOL * stats_one["grad_norm"] for s in stats_two)
    two_params = [_params(m) for m in ray.get(critics.call_all("trained_module"))]
    _check(one, _params(one.model), two_params, halves, p0)
