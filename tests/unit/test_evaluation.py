"""Evaluation math against hand-worked examples and explicit loops."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from rlhf.evaluation import (block_losses, bootstrap_ci, group_means, lm_loss, nested_bootstrap_ci, normal_ci,
                             paired_outcomes,
                             sequence_kl, summed_log_ratio, win_rate, win_rate_ci)

torch.set_num_threads(1)


def test_win_rate_counts_ties_half():
    # win (1>0), tie (2=2), loss (3<4), tie (3=3): (1 + 0.5 + 0 + 0.5) / 4
    assert win_rate([1, 2, 3, 3], [0, 2, 4, 3]) == pytest.approx(0.5)
    assert win_rate([1.0, 1.0, 0.2], [0.0, 0.5, 0.1]) == pytest.approx(1.0)
    assert win_rate([0.0, 0.0], [0.3, 0.0]) == pytest.approx(0.25)
    assert paired_outcomes([2, 1, 1], [1, 1, 2]).tolist() == [1.0, 0.5, 0.0]


def test_win_rate_is_antisymmetric_and_self_is_half():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 4, (50,), generator=g).float()  # small range: many ties
    b = torch.randint(0, 4, (50,), generator=g).float()
    assert win_rate(a, b) + win_rate(b, a) == pytest.approx(1.0)
    assert win_rate(a, a) == 0.5


def test_win_rate_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        win_rate([1, 2], [1])
    with pytest.raises(ValueError):
        win_rate([], [])


def test_summed_log_ratio_matches_loop():
    g = torch.Generator().manual_seed(1)
    lp = -torch.rand(4, 7, generator=g) * 3
    ref = -torch.rand(4, 7, generator=g) * 3
    mask = (torch.rand(4, 7, generator=g) > 0.4).long()
    expected = []
    for b in range(4):
        s = 0.0
        for t in range(7):
            if mask[b, t]:
                s += float(lp[b, t]) - float(ref[b, t])
        expected.append(s)
    got = summed_log_ratio(lp, ref, mask)
    assert got.tolist() == pytest.approx(expected, abs=1e-6)
    assert sequence_kl(lp, ref, mask) == pytest.approx(sum(expected) / 4, abs=1e-6)


def test_sequence_kl_estimates_analytic_kl_on_policy_samples():
    # One-token "responses" from p: the estimator must converge to KL(p || q).
    p = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    q = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    exact = float((p * (p / q).log()).sum())
    g = torch.Generator().manual_seed(2)
    n = 20000
    tokens = torch.multinomial(p, n, replacement=True, generator=g)
    lp = p.log()[tokens][:, None]
    ref = q.log()[tokens][:, None]
    terms = summed_log_ratio(lp, ref, torch.ones_like(lp))
    se = float(terms.std()) / math.sqrt(n)
    assert abs(sequence_kl(lp, ref, torch.ones_like(lp)) - exact) < 5 * se
    assert sequence_kl(lp, lp, torch.ones_like(lp)) == 0.0


def _tiny_lm() -> GPT2LMHeadModel:
    torch.manual_seed(3)
    cfg = GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=1, n_head=2,
                     resid_pdrop=0.3, embd_pdrop=0.3, attn_pdrop=0.3)
    return GPT2LMHeadModel(cfg)


def test_lm_loss_matches_manual_cross_entropy():
    model = _tiny_lm()
    blocks = torch.randint(0, 50, (5, 12), generator=torch.Generator().manual_seed(4))
    model.eval()
    per_block = []
    with torch.no_grad():
        for row in blocks:
            logits = model(row[None]).logits[0]
            nll = [-float(torch.log_softmax(logits[t], -1)[row[t + 1]]) for t in range(len(row) - 1)]
            per_block.append(sum(nll) / len(nll))
    model.train()  # lm_loss must switch dropout off itself and restore the mode
    assert block_losses(model, blocks, batch_size=2).tolist() == pytest.approx(per_block, abs=1e-5)
    assert lm_loss(model, blocks, batch_size=3) == pytest.approx(sum(per_block) / 5, abs=1e-5)
    assert model.training


def test_bootstrap_ci_degenerate_and_bracketing():
    assert win_rate_ci([1, 1, 1], [0, 0, 0]) == (1.0, 1.0)
    assert win_rate_ci([0, 0], [0, 0]) == (0.5, 0.5)
    g = torch.Generator().manual_seed(5)
    outcomes = (torch.rand(400, generator=g) < 0.7).double()
    lo, hi = bootstrap_ci(outcomes, num_resamples=4000, seed=1)
    mean = float(outcomes.mean())
    assert lo < mean < hi
    # For a large sample the percentile bootstrap agrees with mean +- 1.96 se.
    nlo, nhi = normal_ci(outcomes)
    assert lo == pytest.approx(nlo, abs=0.01) and hi == pytest.approx(nhi, abs=0.01)
    # Four times the data: about half the width.
    lo4, hi4 = bootstrap_ci(outcomes.repeat(4), num_resamples=4000, seed=1)
    assert (hi4 - lo4) == pytest.approx((hi - lo) / 2, rel=0.2)


def test_bootstrap_ci_coverage():
    # A 90% interval should contain the true rate in about 90% of experiments.
    g = torch.Generator().manual_seed(6)
    trials, hits, true_p = 300, 0, 0.7
    for i in range(trials):
        data = (torch.rand(60, generator=g) < true_p).double()
        lo, hi = bootstrap_ci(data, confidence=0.9, num_resamples=1000, seed=i)
        hits += lo <= true_p <= hi
    assert 0.82 <= hits / trials <= 0.96


def test_bootstrap_ci_weighted_is_the_pooled_rate():
    # Pairwise accuracy pooled over prompts: sum(right) / sum(pairs), prompts resampled.
    g = torch.Generator().manual_seed(7)
    pairs = torch.randint(1, 31, (600,), generator=g).double()
    p = torch.where(pairs > 15, 0.9, 0.3).double()  # big prompts are easy: the pooled rate is not the plain mean
    right = torch.binomial(pairs, p, generator=g)
    pooled = float(right.sum() / pairs.sum())
    lo, hi = bootstrap_ci(right / pairs, weights=pairs, num_resamples=4000, seed=2)
    # Reference by the delta method for a ratio of sums: se = sqrt(n * sum(z^2) / (n - 1)) / sum(pairs).
    z = right - pooled * pairs
    se = math.sqrt(len(z) * float((z ** 2).sum()) / (len(z) - 1)) / float(pairs.sum())
    assert lo == pytest.approx(pooled - 1.96 * se, abs=0.004)
    assert hi == pytest.approx(pooled + 1.96 * se, abs=0.004)
    assert not lo <= float((right / pairs).mean()) <= hi
    # Equal weights are the plain mean.
    assert bootstrap_ci(right / pairs, weights=[2.0] * 600, seed=3) == pytest.approx(bootstrap_ci(right / pairs, seed=3))
    with pytest.raises(ValueError, match="weight"):
        bootstrap_ci([0.5, 1.0], weights=[1.0])


def test_bootstrap_ci_rejects_bad_input():
    with pytest.raises(ValueError):
        bootstrap_ci([])
    with pytest.raises(ValueError):
        bootstrap_ci([1.0], confidence=1.0)


def test_win_rate_ci_resamples_whole_prompts():
    assert group_means([1.0, 0.0, 1.0, 1.0, 0.0, 0.5], 2).tolist() == [0.5, 1.0, 0.25]
    with pytest.raises(ValueError, match="groups of 4"):
        group_means([1.0, 0.0, 1.0], 4)
    # Four identical samples per prompt carry one prompt's worth of evidence: grouped, the
    # interval is that of the 50 prompts, not of 200 independent outcomes.
    g = torch.Generator().manual_seed(3)
    a = torch.rand(50, generator=g).repeat_interleave(4)
    b = torch.rand(50, generator=g).repeat_interleave(4)
    grouped = win_rate_ci(a, b, group_size=4, seed=2)
    assert grouped == win_rate_ci(a[::4], b[::4], seed=2)
    flat_lo, flat_hi = win_rate_ci(a, b, seed=2)
    assert grouped[1] - grouped[0] > 1.5 * (flat_hi - flat_lo)


def test_nested_bootstrap_one_group_is_the_plain_bootstrap():
    g = torch.Generator().manual_seed(8)
    x = torch.rand(150, generator=g)
    assert nested_bootstrap_ci([x], seed=4) == pytest.approx(bootstrap_ci(x, seed=4))
    with pytest.raises(ValueError, match="group"):
        nested_bootstrap_ci([x, []])


def test_nested_bootstrap_width_follows_seeds_and_prompts():
    # Reference by the variance of a two-stage sample: with G seeds of n prompts each, the mean of seed
    # means has variance (s_between^2 + s_within^2 / n) / G, estimated here from the data themselves.
    g = torch.Generator().manual_seed(9)
    for spread, n in ((0.3, 400), (0.0, 50)):
        centres = 0.5 + spread * torch.randn(5, generator=g)
        groups = [c + 0.2 * torch.randn(n, generator=g) for c in centres]
        means = torch.stack([x.mean() for x in groups]).double()
        within = float(torch.stack([x.var() for x in groups]).mean())
        # a bootstrap's own variance estimate: plug-in (divide by G, by n), not unbiased
        var = (float(means.var(unbiased=False)) + within * (n - 1) / n / n) / len(groups)
        lo, hi = nested_bootstrap_ci(groups, num_resamples=8000, seed=5)
        centre = float(means.mean())
        assert lo < centre < hi
        assert (hi - lo) / 2 == pytest.approx(1.96 * math.sqrt(var), rel=0.2)
    # Seeds that disagree widen the interval far beyond what their prompts alone would give.
    apart = [torch.full((300,), 0.2) + 0.01 * torch.randn(300, generator=g), torch.full((300,), 0.8)]
    lo, hi = nested_bootstrap_ci(apart, seed=6)
    plain = bootstrap_ci(torch.cat(apart), seed=6)
    assert hi - lo > 5 * (plain[1] - plain[0])
