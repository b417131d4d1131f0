"""The PPO learners under each TrainLayout (rlhf/sharding.py), on real gloo groups of Ray actors.

- fsdp: 2 ranks of FSDP2 shards make the same PPO-ptx (and value) step as one full
  replica, within float32 summation-order noise, also with a rank that has no rows;
  a reference sharded over 2 ranks scores as the whole one;
- micro-batches: 4 forward/backward pieces make the same step as 1 (float64, 1e-9);
- bf16: DDP (autocast) and FSDP (MixedPrecisionPolicy) steps are finite, keep float32
  master weights and start at ratio ~1;
- sharded checkpoints: a fresh group loaded from one repeats the saved group's next step
  bit for bit; the exported HF directory holds the gathered EMA weights; publishing
  gathers the whole weights bucket by bucket.

Adam's eps is 1, as in test_learner_token_mean.py: the first step is then ~lr * g,
so a wrongly scaled gradient shows (at eps 1e-8 the step would be ~lr * sign(g)).
"""
import sys

import pytest
import ray
import torch

from actors.critic import CriticLearner
from actors.group import WorkerGroup
from actors.policy_learner import PolicyLearner
from actors.reference_scorer import ReferenceScorer
from actors.weight_sync import resolve_buckets, unpack_buckets
from rlhf.collate import lm_batch, pack_text
from rlhf.config import OptimizerConfig, PPOConfig
from rlhf.experience import Experience
from rlhf.models import load_policy
from rlhf import sharding
from rlhf.sharding import TrainLayout

pytestmark = pytest.mark.slow

TEXTS = ["the red fox runs over the hill", "a blue bird sings at dawn", "one two three four five six"] * 20
LR, EPS = 0.1, 1.0
# float32: FSDP's reduce-scatter sums in another order than one rank's backward.
FSDP_TOL = 2e-5
CPU = 0.25


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, actor_models, ragged_batch):
    d = actor_models(tmp_path_factory.mktemp("tiny_sharding"), TEXTS)
    return d | {"batch": ragged_batch(d["tok"])}


def _ppo(**kw) -> PPOConfig:
    return PPOConfig(lr=LR, critic_lr=LR, warmup_iterations=0, **kw)


def _opt() -> OptimizerConfig:
    return OptimizerConfig(eps=EPS)


def _experience(ids, attn, act, old_logprobs, old_values, version=0) -> Experience:
    g = torch.Generator().manual_seed(1)
    m = act.to(old_logprobs.dtype)
    noise = torch.randn(m.shape, generator=g, dtype=torch.float64).to(m.dtype)
    return Experience(input_ids=ids, attention_mask=attn, action_mask=act,
                      old_logprobs=old_logprobs * m, ref_logprobs=old_logprobs * m,
                      old_values=old_values * m, advantages=noise * m, returns=(old_values + noise) * m,
                      weight_version=version)


def _ptx(tok):
    return lm_batch(pack_text(tok, TEXTS, seq_len=12)).select(slice(0, 8))


def _local(cls, path, dtype="float32", **ppo):
    return cls(path, _ppo(**ppo), _opt(), num_threads=1, device="cpu", layout=TrainLayout(dtype=dtype))


def _group(cls, path, strategy="fsdp", dtype="float32", n=2, **ppo):
    return WorkerGroup(cls, n, path, _ppo(**ppo), _opt(), num_cpus=CPU, num_threads=1, device="cpu",
                       layout=TrainLayout(strategy=strategy, dtype=dtype), bucket_cap_mb=0.05)


def _full_params(group) -> list[dict[str, torch.Tensor]]:
    """Every rank's whole weights (gathered from the shards: a collective)."""
    return ray.get(group.call_all("full_parameters"))


def _max_diff(a, b) -> float:
    return max(float((a[n].detach() - b[n].detach()).abs().max()) for n in a)


def _policy_experience(learner, batch, dtype=torch.float32):
    ids, attn, act = batch
    return _experience(ids, attn, act, learner.logprobs(ids, attn), torch.zeros(ids.shape, dtype=dtype))


def _publish_growth(learner) -> int:
    """Peak bytes `publish_weights` allocates on this rank (runs inside the actor)."""
    from rlhf.memory_measure import measure_peak
    return measure_peak(learner.publish_weights)[1].growth


@pytest.fixture(scope="module")
def fsdp_groups(ray_local, dirs):
    learners, critics = _group(PolicyLearner, dirs["policy"]), _group(CriticLearner, dirs["rm"])
    yield learners, critics
    learners.shutdown()
    critics.shutdown()


def test_fsdp_policy_step_equals_the_replica_step(dirs, fsdp_groups):
    tok, (learners, _) = dirs["tok"], fsdp_groups
    one = _local(PolicyLearner, dirs["policy"])
    start = {n: p.detach().clone() for n, p in one.model.named_parameters()}
    exp, ptx = _policy_experience(one, dirs["batch"]), _ptx(tok)
    shard_logprobs = torch.cat(ray.get(learners.call_sharded(
        "logprobs", exp.input_ids.chunk(2), exp.attention_mask.chunk(2))))
    torch.testing.assert_close(shard_logprobs * exp.action_mask, exp.old_logprobs, atol=1e-5, rtol=0)

    stats_one = one.train_minibatch(exp, ptx, ptx_coef=1.0)
    stats_two = ray.get(learners.call_sharded("train_minibatch", exp.chunk(2), ptx.chunk(2), ptx_coef=1.0))
    assert stats_one["ptx_grad_norm"] > 0 and stats_one["skipped"] == 0
    for s in stats_two:
        assert abs(s["grad_norm"] - stats_one["grad_norm"]) < 1e-5 * stats_one["grad_norm"]
    one_params = {n: p.detach() for n, p in one.model.named_parameters()}
    moved = _max_diff(one_params, start)
    for params in _full_params(learners):
        assert _max_diff(params, one_params) < FSDP_TOL < moved / 100  # the step itself is far larger
    # Each rank holds half of every sharded parameter, and Adam's moments alike.
    shard, whole = ray.get(learners.call_rank0("local_numel")), sum(p.numel() for p in one_params.values())
    assert shard < 0.6 * whole


def test_fsdp_critic_step_equals_the_replica_step(dirs, fsdp_groups):
    tok, (_, critics) = dirs["tok"], fsdp_groups
    one = _local(CriticLearner, dirs["rm"])
    ids, attn, act = dirs["batch"]
    exp = _experience(ids, attn, act, torch.zeros(ids.shape), one.values(ids, attn))
    stats_one = one.train_minibatch(exp)
    stats_two = ray.get(critics.call_sharded("train_minibatch", exp.chunk(2)))
    for s in stats_two:
        assert abs(s["grad_norm"] - stats_one["grad_norm"]) < 1e-5 * stats_one["grad_norm"]
    one_params = {n: p.detach() for n, p in one.model.named_parameters()}
    for params in _full_params(critics):
        assert _max_diff(params, one_params) < FSDP_TOL


def test_fsdp_ranks_without_rows_keep_in_step_and_change_nothing(dirs, ray_local):
    """More ranks than rows (a paper-size model sharded wider than its minibatch): one
    episode and 3 ptx rows one at a time (ppo.ptx_micro_batch_size) over 2 ranks, so rank 0
    has no episode and rank 1 one ptx piece fewer; each runs throwaway passes for what it
    lacks, and the step is the replica's."""
    tok = dirs["tok"]
    ids, attn, act = (t[:1] for t in dirs["batch"])
    ptx = _ptx(tok).select(slice(0, 3))
    one, critic = _local(PolicyLearner, dirs["policy"]), _local(CriticLearner, dirs["rm"])
    exp = _experience(ids, attn, act, one.logprobs(ids, attn), critic.values(ids, attn))
    learners = _group(PolicyLearner, dirs["policy"], ptx_micro_batch_size=1)
    critics = _group(CriticLearner, dirs["rm"])
    try:
        stats = ray.get(learners.call_sharded("train_minibatch", exp.chunk(2), ptx.chunk(2), ptx_coef=1.0))
        ray.get(critics.call_sharded("train_minibatch", exp.chunk(2)))
        assert [len(s) for s in exp.chunk(2)] == [0, 1] and [len(s) for s in ptx.chunk(2)] == [2, 1]
        assert "loss" not in stats[0] and "loss" in stats[1]  # rank 0 had no episode to report on
        one_stats = one.train_minibatch(exp, ptx, ptx_coef=1.0)
        critic.train_minibatch(exp)
        assert all(abs(s["grad_norm"] - one_stats["grad_norm"]) < 1e-5 * one_stats["grad_norm"] for s in stats)
        for group, local in ((learners, one), (critics, critic)):
            mine = {n: p.detach() for n, p in local.model.named_parameters()}
            for params in _full_params(group):
                assert _max_diff(params, mine) < FSDP_TOL
    finally:
        learners.shutdown()
        critics.shutdown()


def test_a_sharded_reference_scores_as_the_whole_one(dirs, ray_local):
    """ppo.num_reference_scorers = 2: each rank holds half the weights and scores its share;
    3 rows in forwards of 1 leave rank 1 a forward short, which it runs on a throwaway row."""
    ids, attn, _ = (t[:3] for t in dirs["batch"])
    whole = ReferenceScorer(dirs["policy"], num_threads=1, device="cpu", batch_size=1, temperature=0.7)
    group = WorkerGroup(ReferenceScorer, 2, dirs["policy"], num_cpus=CPU, num_threads=1, device="cpu",
                        batch_size=1, temperature=0.7)
    try:
        group.wait_ready()  # sharded; after a forward FSDP2 keeps the root gathered (its next use)
        count = lambda r: sum(sharding.local(p).numel() for p in r.model.parameters())  # noqa: E731
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests
        held = ray.get([w.__ray_call__.remote(count) for w in group.workers])
        assert all(n < 0.6 * count(whole) for n in held), (held, count(whole))
        shards = ray.get(group.call_sharded("logprobs", ids.chunk(2), attn.chunk(2)))
        assert [len(s) for s in shards] == [2, 1]
        torch.testing.assert_close(torch.cat(shards), whole.logprobs(ids, attn), atol=1e-6, rtol=0)
    finally:
        group.shutdown()


@pytest.mark.parametrize("cls", [PolicyLearner, CriticLearner])
def test_four_micro_batches_make_the_one_pass_update(dirs, cls):
    tok = dirs["tok"]
    path = dirs["policy"] if cls is PolicyLearner else dirs["rm"]
    whole, pieces = _local(cls, path, "float64"), _local(cls, path, "float64", micro_batch_size=2)
    assert pieces.micro_batches(8) == 4
    ids, attn, act = dirs["batch"]
    if cls is PolicyLearner:
        exp = _experience(ids, attn, act, whole.logprobs(ids, attn), torch.zeros(ids.shape, dtype=torch.float64))
        a, b = whole.train_minibatch(exp, _ptx(tok), ptx_coef=1.0), pieces.train_minibatch(exp, _ptx(tok), ptx_coef=1.0)
    else:
        exp = _experience(ids, attn, act, torch.zeros(ids.shape, dtype=torch.float64), whole.values(ids, attn))
        a, b = whole.train_minibatch(exp), pieces.train_minibatch(exp)
    assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-9 * a["grad_norm"]
    for k in ("loss", "value_loss", "ptx_loss", "clipfrac", "approx_kl", "entropy"):
        if k in a:
            assert abs(a[k] - b[k]) < 1e-9, k  # token-weighted means over the pieces
    assert _max_diff(dict(whole.model.named_parameters()), dict(pieces.model.named_parameters())) < 1e-9


def test_ptx_rows_one_at_a_time_make_the_one_pass_update(dirs):
    tok = dirs["tok"]
    whole = _local(PolicyLearner, dirs["policy"], "float64")
    rows = _local(PolicyLearner, dirs["policy"], "float64", micro_batch_size=4, ptx_micro_batch_size=1)
    ids, attn, act = dirs["batch"]
    exp = _experience(ids, attn, act, whole.logprobs(ids, attn), torch.zeros(ids.shape, dtype=torch.float64))
    a, b = whole.train_minibatch(exp, _ptx(tok), ptx_coef=1.0), rows.train_minibatch(exp, _ptx(tok), ptx_coef=1.0)
    assert rows.micro_batches(len(_ptx(tok)), 1) == 8
    assert abs(a["ptx_grad_norm"] - b["ptx_grad_norm"]) < 1e-9 * a["ptx_grad_norm"]
    assert abs(a["ptx_loss"] - b["ptx_loss"]) < 1e-9
    assert _max_diff(dict(whole.model.named_parameters()), dict(rows.model.named_parameters())) < 1e-9


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_bf16_steps_keep_float32_masters_and_start_on_policy(dirs, ray_local, strategy):
    tok = dirs["tok"]
    group = _group(PolicyLearner, dirs["policy"], strategy=strategy, dtype="bfloat16", n=2 if strategy == "fsdp" else 1)
    try:
        ids, attn, act = dirs["batch"]
        old = torch.cat(ray.get(group.call_sharded("logprobs", ids.chunk(len(group)), attn.chunk(len(group)))))
        assert old.dtype == torch.float32
        exp = _experience(ids, attn, act, old, torch.zeros(ids.shape))
        before = _full_params(group)[0]
        stats = ray.get(group.call_sharded("train_minibatch", exp.chunk(len(group)),
                                           _ptx(tok).chunk(len(group)), ptx_coef=1.0))
        after = _full_params(group)[0]
        assert all(s["skipped"] == 0 for s in stats)
        assert all(v.dtype == torch.float32 for v in after.values())  # the master copy
        assert 0 < _max_diff(after, before) and all(torch.isfinite(v).all() for v in after.values())
        # Old logprobs were scored in bf16 too: the first minibatch is on-policy.
        assert all(abs(s["ratio_mean"] - 1.0) < 1e-3 and s["approx_kl"] < 1e-4 for s in stats)
        # bf16 compute differs from float32: the step is not secretly a float32 one.
        one = _local(PolicyLearner, dirs["policy"])
        assert float((one.logprobs(ids, attn) * act - old * act).abs().max()) > 1e-4
    finally:
        group.shutdown()


def test_sharded_checkpoint_resumes_exactly_and_exports(dirs, fsdp_groups, ray_local, tmp_path):
    tok, (learners, _) = dirs["tok"], fsdp_groups
    version = ray.get(learners.call_rank0("weight_version"))
    ids, attn, act = dirs["batch"]

    def experience():
        old = torch.cat(ray.get(learners.call_sharded("logprobs", ids.chunk(2), attn.chunk(2))))
        return _experience(ids, attn, act, old, torch.zeros(ids.shape), version)
    ray.get(learners.call_sharded("train_minibatch", experience().chunk(2), _ptx(tok).chunk(2), ptx_coef=1.0))
    ray.get(learners.call_all("save_checkpoint", str(tmp_path), "policy"))
    files = sorted(p.name for p in (tmp_path / "policy").iterdir())
    assert ".metadata" in files and {"rank0.pt", "rank1.pt"} <= set(files)
    assert sum(f.endswith(".distcp") for f in files) == 2  # one shard file per rank

    fresh = _group(PolicyLearner, dirs["policy"])
    try:
        ray.get(fresh.call_all("load_checkpoint", str(tmp_path), "policy"))
        assert ray.get(fresh.call_all("checksum")) == ray.get(learners.call_all("checksum"))
        exp = experience()
        a = ray.get(learners.call_sharded("train_minibatch", exp.chunk(2), _ptx(tok).chunk(2), ptx_coef=1.0))
        b = ray.get(fresh.call_sharded("train_minibatch", exp.chunk(2), _ptx(tok).chunk(2), ptx_coef=1.0))
        assert [s["grad_norm"] for s in a] == [s["grad_norm"] for s in b]
        assert ray.get(fresh.call_all("checksum")) == ray.get(learners.call_all("checksum"))  # Adam came along

        out = ray.get(fresh.call_all("save_pretrained", str(tmp_path / "hf"), use_ema=True))
        assert out[1] is None and out[0] == str(tmp_path / "hf")
        ema = ray.get(fresh.call_all("full_ema"))[0]  # a collective: every rank gathers
        saved = dict(load_policy(out[0]).named_parameters())
        assert all(torch.equal(saved[n], ema[n]) for n in ema)
        assert not all(torch.equal(saved[n], w) for n, w in _full_params(fresh)[0].items())  # EMA, not current

        refs, metas, _ = ray.get(fresh.call_all("publish_weights"))[0]
        assert len(metas) > 1  # a small cap: several buckets, gathered one at a time
        buffers, _ = resolve_buckets(refs)
        published = unpack_buckets(buffers, metas)
        full = _full_params(fresh)[0]
        assert set(published) == set(full) and all(torch.equal(published[n], full[n]) for n in full)

        # Beyond its shard, a publishing rank holds at most one bucket and one gathered tensor.
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests
        growth = ray.get([w.__ray_call__.remote(_publish_growth) for w in fresh.workers])
        bucket = max(m.numel for m in metas) * 4
        tensor = max(t.numel() for t in full.values()) * 4
        assert all(g <= bucket + tensor + 64 * 1024 for g in growth), (growth, bucket, tensor)
    finally:
        fresh.shutdown()
