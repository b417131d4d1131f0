"""The PPO actors on a real local Ray cluster with tiny models.

Actors are created once for the module (start-up dominates the cost) and the
tests run in file order against them: the learner-group test steps the learners
at version 0, the sync test then ends the iteration (version 1) and broadcasts.
"""
import math

import pytest
import ray
import torch

from actors.critic import CriticLearner
from actors.engines.hf_engine import HFEngine, budget_chunks
from actors.generator import RolloutGenerator
from actors.group import WorkerGroup
from actors.policy_learner import PolicyLearner, StaleRolloutError
from actors.reference_scorer import ReferenceScorer
from actors.resources import actor_class
from actors.weight_sync import checksum
from actors.reward_scorer import RewardScorer
from rlhf.collate import lm_batch, pack_text
from rlhf.config import OptimizerConfig, PPOConfig
from rlhf.experience import Experience, Rollout, build_experience
from rlhf.forward import token_logprobs
from rlhf.losses import policy_loss
from rlhf.models import ScalarModel, load_policy
from rlhf.sampling import sample

TEXTS = ["the red fox runs over the hill", "a blue bird sings at dawn", "one two three four five six"] * 20
PROMPTS = ["the red", "a blue bird", "one two", "the", "six five four", "a", "fox runs", "hill sings"]
CPU = 0.25  # 7 actors on 2 cores


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, actor_models):
    # reward_bias: the scorer must apply the RM's normalisation bias
    return actor_models(tmp_path_factory.mktemp("tiny"), TEXTS, reward_bias=0.5)


@pytest.fixture(scope="module")
def team(ray_local, dirs):  # ray_local: the session cluster of conftest.py (2 CPUs)
    ppo = PPOConfig(lr=3e-3, warmup_iterations=0)
    # num_threads None: the second generator derives its thread count from Ray's grant
    gens = [actor_class(RolloutGenerator, CPU).remote(dirs["policy"], engine="hf", seed=i, num_threads=n,
                                                      device="cpu") for i, n in enumerate([1, None])]
    rm = actor_class(RewardScorer, CPU).remote(dirs["rm"], num_threads=1, device="cpu")
    ref = actor_class(ReferenceScorer, CPU).remote(dirs["policy"], num_threads=1, device="cpu")
    learners = WorkerGroup(PolicyLearner, 2, dirs["policy"], ppo, OptimizerConfig(), num_cpus=CPU,
                           num_threads=1, device="cpu")
    # Adam moves every weight by ~lr per step: a small LR so one step cannot overshoot.
    critic_ppo = PPOConfig(critic_lr=1e-4, warmup_iterations=0)
    critics = WorkerGroup(CriticLearner, 1, dirs["rm"], critic_ppo, OptimizerConfig(), num_cpus=CPU,
                          num_threads=1, device="cpu")
    yield {"gens": gens, "rm": rm, "ref": ref, "learners": learners, "critics": critics}
    learners.shutdown()
    critics.shutdown()
    for a in gens + [rm, ref]:
        ray.kill(a)


def _prompt_ids(tok):
    return [tok(p)["input_ids"] for p in PROMPTS]


def _experience(rollout, old_logprobs, version, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = rollout.action_mask.float()
    return Experience(
        input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
        action_mask=rollout.action_mask, old_logprobs=old_logprobs, ref_logprobs=old_logprobs,
        old_values=torch.zeros_like(m), advantages=torch.randn(m.shape, generator=g) * m,
        returns=torch.randn(m.shape, generator=g) * m, weight_version=version)


def _ptx(tok):
    return lm_batch(pack_text(tok, TEXTS, seq_len=12)).select(slice(0, 8))


# ---------------------------------------------------------------- no Ray


def test_budget_chunks_keep_every_call_within_the_token_budget():
    lengths = [3, 9, 2, 2, 7, 1, 30, 4]
    chunks = budget_chunks(lengths, max_new_tokens=5, token_budget=40)
    assert [i for c in chunks for i in c] == list(range(len(lengths)))  # all rows, in order
    for c in chunks:
        cost = len(c) * (max(lengths[i] for i in c) + 5)
        assert cost <= 40 or len(c) == 1  # only a lone over-budget row may exceed it


def test_hf_engine_split_batches_align_to_one_batch(dirs):
    tok = dirs["tok"]
    prompts = _prompt_ids(tok)
    engine = HFEngine(dirs["policy"], device="cpu", token_budget=12)
    s = engine.generate(prompts, max_new_tokens=4, seed=0)
    assert len(budget_chunks([len(p) for p in prompts], 4, 12)) > 1  # really split
    assert s.input_ids.shape[0] == len(prompts)
    prompt_mask = s.attention_mask.bool() & ~s.action_mask.bool()
    for i, p in enumerate(prompts):
        assert s.input_ids[i][prompt_mask[i]].tolist() == p
        assert s.attention_mask[i, s.prompt_width - 1] == 1  # prompts end at the shared width
    assert not s.action_mask[:, : s.prompt_width].any()
    # logprobs of the split batch equal a full forward of the aligned rows
    full = token_logprobs(engine.model, s.input_ids, s.attention_mask)
    m = s.action_mask.bool()
    torch.testing.assert_close(full[m], s.sampler_logprobs[m], atol=1e-4, rtol=1e-4)


def _local_learner(dirs, **ppo):
    return PolicyLearner(dirs["policy"], PPOConfig(lr=3e-3, warmup_iterations=2, **ppo), OptimizerConfig(),
                         num_threads=1, device="cpu")


def test_hf_engine_borrows_an_immutable_snapshot_and_copies_anything_else(dirs):
    engine = HFEngine(dirs["policy"], device="cpu")
    named = {n: p.detach().clone() + 0.5 for n, p in engine.model.named_parameters()}
    engine.load_weights(named.items())
    assert all(p.data_ptr() != named[n].data_ptr() for n, p in engine.model.named_parameters())
    engine.load_weights(named.items(), borrow=True)
    assert all(p.data_ptr() == named[n].data_ptr() for n, p in engine.model.named_parameters())
    assert engine.state_checksum() == checksum(named)
    emb = engine.model.get_input_embeddings().weight
    assert engine.model.get_output_embeddings().weight.data_ptr() == emb.data_ptr()  # still tied
    s = engine.generate(_prompt_ids(dirs["tok"]), 4, seed=0)  # samples from the borrowed weights
    torch.testing.assert_close(token_logprobs(engine.model, s.input_ids, s.attention_mask)[s.action_mask.bool()],
                               s.sampler_logprobs[s.action_mask.bool()], atol=1e-4, rtol=1e-4)


def _local_experience(learner, tok, seed):
    s = HFEngine(learner.policy_path, device="cpu").generate(_prompt_ids(tok), 5, seed=seed)
    return _experience(s, learner.logprobs(s.input_ids, s.attention_mask), learner.version, seed)


def test_learner_checkpoint_resumes_bit_exactly_and_saves_ema_weights(dirs, tmp_path):
    tok = dirs["tok"]
    a = _local_learner(dirs)
    a.train_minibatch(_local_experience(a, tok, 0), _ptx(tok))
    a.end_iteration()
    b = _local_learner(dirs)
    b.load_checkpoint_state(a.state_dict_for_checkpoint())
    assert b.version == 1 and b.checksum() == a.checksum()
    exp = _local_experience(a, tok, 1)
    sa, sb = a.train_minibatch(exp, _ptx(tok)), b.train_minibatch(exp, _ptx(tok))
    assert sa["lr"] == sb["lr"] > 3e-4  # the schedule resumed mid-warmup, not from its start
    assert a.checksum() == b.checksum()  # optimizer moments and EMA came along too
    out = a.save_pretrained(str(tmp_path / "ema"))
    saved = dict(load_policy(out).named_parameters())
    assert all(torch.equal(saved[n], a.ema.shadow[n]) for n in a.ema.shadow)
    assert not torch.equal(saved["transformer.h.0.mlp.c_fc.weight"],
                           dict(a.model.named_parameters())["transformer.h.0.mlp.c_fc.weight"])
    assert (tmp_path / "ema" / "tokenizer_config.json").exists()


def test_non_finite_gradients_skip_the_step_and_keep_weights(dirs):
    tok = dirs["tok"]
    learner = _local_learner(dirs)
    exp = _local_experience(learner, tok, 0)
    before = learner.checksum()
    bad = exp.replace(advantages=torch.where(exp.action_mask.bool(), torch.inf, 0.0))
    stats = learner.train_minibatch(bad, None)
    assert stats["skipped"] == 1 and learner.nonfinite_steps == 1 and learner.checksum() == before
    assert learner.ema.num_updates == 0
    ok = learner.train_minibatch(exp, None)
    assert ok["skipped"] == 0 and learner.checksum() != before
    assert all(torch.isfinite(p).all() for p in learner.model.parameters())


def test_learner_and_reference_score_at_the_sampler_temperature(dirs):
    tok, temp = dirs["tok"], 0.7
    learner = _local_learner(dirs, temperature=temp)
    ref = ReferenceScorer(dirs["policy"], num_threads=1, device="cpu", temperature=temp)
    s = sample(load_policy(dirs["policy"]).eval(), _prompt_ids(tok), 6, tok.eos_token_id, tok.pad_token_id,
               temperature=temp, generator=torch.Generator().manual_seed(0))
    rollout = Rollout(s.input_ids, s.attention_mask, s.action_mask, s.sampler_logprobs, PROMPTS, learner.version)
    act, m = s.action_mask.bool(), s.action_mask.float()
    old = learner.logprobs(s.input_ids, s.attention_mask)
    torch.testing.assert_close(old[act], s.sampler_logprobs[act], atol=1e-5, rtol=0)
    # Scored at T=1 the same tokens are far off: this test fails if the learner ignores T.
    with torch.no_grad():
        at_one = token_logprobs(learner.model, s.input_ids, s.attention_mask)
    assert float((at_one - s.sampler_logprobs)[act].abs().max()) > 0.05
    _, off = policy_loss(at_one, s.sampler_logprobs, torch.ones_like(m), act)
    assert off["approx_kl"] > 1e-3 and abs(off["ratio_mean"] - 1) > 1e-3

    # as the driver scores a rollout (orchestration/ppo/trainer.py `score`)
    exp, stats = build_experience(rollout, old * m, ref.logprobs(s.input_ids, s.attention_mask) * m,
                                  torch.zeros_like(m), torch.linspace(-1, 1, len(PROMPTS)),
                                  kl_coef=0.1, gamma=1.0, lam=0.95)
    assert stats["kl_per_token"] == pytest.approx(0.0, abs=1e-6)  # same weights, same temperature
    first = learner.train_minibatch(exp, _ptx(tok))
    assert first["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert first["approx_kl"] == pytest.approx(0.0, abs=1e-6) and first["clipfrac"] == 0.0


# ---------------------------------------------------------------- actors


def test_generator_returns_a_consistent_rollout(team, dirs):
    tok = dirs["tok"]
    r = ray.get(team["gens"][0].generate.remote(_prompt_ids(tok), PROMPTS, 6, 1.0, 1.0, 0))
    assert r.weight_version == 0 and r.prompts == PROMPTS
    act, attn = r.action_mask.bool(), r.attention_mask.bool()
    assert act.any() and not (act & ~attn).any()  # responses are attended
    assert (r.sampler_logprobs[~act] == 0).all() and (r.sampler_logprobs[act] < 0).all()
    for i, p in enumerate(_prompt_ids(tok)):
        assert r.input_ids[i][attn[i] & ~act[i]].tolist() == p
        n = int(act[i].sum())
        assert 1 <= n <= 6
    again = ray.get(team["gens"][0].generate.remote(_prompt_ids(tok), PROMPTS, 6, 1.0, 1.0, 0))
    assert torch.equal(again.input_ids, r.input_ids)  # seeded calls repeat


def test_scorers_match_direct_model_calls(team, dirs):
    tok = dirs["tok"]
    r = ray.get(team["gens"][1].generate.remote(_prompt_ids(tok), PROMPTS, 6, 1.0, 1.0, 3))
    rewards, ref_lp = ray.get([team["rm"].score.remote(r.input_ids, r.attention_mask),
                               team["ref"].logprobs.remote(r.input_ids, r.attention_mask)])
    rm = ScalarModel.from_pretrained(dirs["rm"]).eval()
    for i in range(len(PROMPTS)):  # each row unpadded: head on the backbone's last state, plus the bias
        ids = r.input_ids[i][r.attention_mask[i].bool()][None]
        with torch.no_grad():
            raw = rm.head(rm.model.base_model(input_ids=ids).last_hidden_state[0, -1])
        assert math.isclose(float(rewards[i]), float(raw) + 0.5, abs_tol=1e-5)
    policy = load_policy(dirs["policy"]).eval()
    torch.testing.assert_close(ref_lp, token_logprobs(policy, r.input_ids, r.attention_mask))


def test_learner_group_steps_jointly_and_stays_bit_identical(team, dirs):
    tok, learners = dirs["tok"], team["learners"]
    sums0 = ray.get(learners.call_all("checksum"))
    assert sums0[0] == sums0[1]
    r = ray.get(team["gens"][0].generate.remote(_prompt_ids(tok), PROMPTS, 6, 1.0, 1.0, 1))
    old = ray.get(learners.call_rank0("logprobs", r.input_ids, r.attention_mask))
    exp, ptx = _experience(r, old, version=0), _ptx(tok)

    stats = ray.get(learners.call_sharded("train_minibatch", exp.chunk(2), ptx.chunk(2), ptx_coef=1.0))
    sums1 = ray.get(learners.call_all("checksum"))
    assert sums1[0] == sums1[1] != sums0[0]  # different shards, one all-reduced step
    for s in stats:
        assert s["ppo_grad_norm"] > 0 and s["ptx_grad_norm"] > 0 and math.isfinite(s["ptx_loss"])
        assert s["skipped"] == 0 and s["grad_norm"] > 0
    assert stats[0]["ppo_grad_norm"] != stats[1]["ppo_grad_norm"]  # the shards really differed
    assert stats[0]["grad_norm"] == stats[1]["grad_norm"]  # ...and the step used the reduced mean

    plain = ray.get(learners.call_sharded("train_minibatch", exp.chunk(2), ptx.chunk(2), ptx_coef=0.0))
    for s in plain:
        assert s["ppo_grad_norm"] > 0 and s["ptx_grad_norm"] == 0.0 and math.isfinite(s["ptx_loss"])
    sums2 = ray.get(learners.call_all("checksum"))
    assert sums2[0] == sums2[1] != sums1[0]

    future = exp.replace(weight_version=1)
    for ref in learners.call_sharded("train_minibatch", future.chunk(2), ptx.chunk(2)):
        with pytest.raises(StaleRolloutError):
            ray.get(ref)
    assert ray.get(learners.call_all("checksum")) == sums2  # a refused batch changes nothing


def test_weight_sync_reaches_both_generators_with_the_new_version(team, dirs):
    tok, learners, gens = dirs["tok"], team["learners"], team["gens"]
    assert ray.get(learners.call_all("end_iteration")) == [1, 1]
    refs, meta, version = ray.get(learners.call_rank0("publish_weights"))
    assert version == 1 and 1 <= len(refs) <= 2  # one fp32 bucket for a tiny model
    digest = ray.get(learners.call_rank0("checksum"))
    assert all(c != digest for c in ray.get([g.checksum.remote() for g in gens]))
    reported = ray.get([g.update_weights.remote(version, meta, *refs) for g in gens])
    assert reported == [digest, digest]
    assert ray.get([g.weight_version.remote() for g in gens]) == [1, 1]

    r = ray.get(gens[1].generate.remote(_prompt_ids(tok), PROMPTS, 6, 1.0, 1.0, 5))
    assert r.weight_version == 1
    learner_lp = ray.get(learners.call_rank0("logprobs", r.input_ids, r.attention_mask))
    m = r.action_mask.bool()
    torch.testing.assert_close(r.sampler_logprobs[m], learner_lp[m], atol=1e-4, rtol=1e-4)

    stale = _experience(r, learner_lp, version=0)  # sampled before the update
    for ref in learners.call_sharded("train_minibatch", stale.chunk(2), [None, None]):
        with pytest.raises(StaleRolloutError):
            ray.get(ref)


def test_critic_step_lowers_value_loss_on_a_fixed_batch(team, dirs):
    tok, critics = dirs["tok"], team["critics"]
    r = ray.get(team["gens"][0].generate.remote(_prompt_ids(tok), PROMPTS, 6, 1.0, 1.0, 2))
    values = ray.get(critics.call_rank0("values", r.input_ids, r.attention_mask))
    assert values.shape == r.input_ids.shape and (values[:, 0] == 0).all()
    # a target the value head can reach inside the clip range: every return 0.15 above V
    returns = (values + 0.15) * r.action_mask
    exp = _experience(r, torch.zeros_like(values), version=0).replace(old_values=values, returns=returns)
    losses = [ray.get(critics.call_sharded("train_minibatch", [exp]))[0]["value_loss"] for _ in range(6)]
    assert max(losses[1:]) < 0.5 * losses[0], losses
