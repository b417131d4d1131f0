"""Losses vs explicit Python loops, hand-worked values and torch references."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from rlhf.losses import (
    entropy_from_logits,
    explained_variance,
    logprobs_from_logits,
    policy_loss,
    ptx_lm_loss,
    ranking_pairs,
    rm_bias,
    rm_ranking_loss,
    value_loss,
)

# ---------------------------------------------------------------- RM loss


def _loop_rm_loss(scores, ranks, groups):
    """Reference: per prompt, loop over all pairs of its completions."""
    losses, n_pairs, correct, margins = [], 0, 0, []
    for g in sorted(set(groups)):
        idx = [i for i, gi in enumerate(groups) if gi == g]
        terms = []
        for a, b in itertools.combinations(idx, 2):
            if ranks[a] == ranks[b]:
                continue
            w, lo = (a, b) if ranks[a] < ranks[b] else (b, a)
            d = scores[w] - scores[lo]
            terms.append(math.log(1.0 / (1.0 + math.exp(-d))))
            correct += d > 0
            margins.append(d)
        if terms:
            losses.append(-sum(terms) / len(terms))
            n_pairs += len(terms)
    return sum(losses) / len(losses), n_pairs, correct / n_pairs, sum(margins) / len(margins)


def test_ranking_pairs():
    assert ranking_pairs([1, 0, 2]) == [(0, 2), (1, 0), (1, 2)]
    assert len(ranking_pairs(list(range(9)))) == math.comb(9, 2)
    assert ranking_pairs([0, 0, 1]) == [(0, 2), (1, 2)]  # the tie gives no pair


def test_rm_loss_hand_worked_k3():
    # completion ranks 0 > 1 > 2 with scores 2, 1, -1
    # pairs: (2-1)=1, (2+1)=3, (1+1)=2 -> loss = mean(softplus(-d))
    scores = torch.tensor([2.0, 1.0, -1.0])
    ranks = torch.tensor([0, 1, 2])
    loss, stats = rm_ranking_loss(scores, ranks, torch.zeros(3, dtype=torch.long))
    expected = (math.log1p(math.exp(-1)) + math.log1p(math.exp(-3)) + math.log1p(math.exp(-2))) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats["n_pairs"] == 3
    assert stats["accuracy"] == 1.0
    assert stats["margin"] == pytest.approx(2.0)


def test_rm_loss_mixed_k_with_ties_matches_loop():
    g = torch.Generator().manual_seed(0)
    scores, ranks, groups = [], [], []
    for prompt, k in enumerate(range(2, 10)):
        s = torch.randn(k, generator=g).tolist()
        r = torch.randperm(k, generator=g).tolist()
        if k in (4, 7):  # some ties
            r[0] = r[1]
        scores += s
        ranks += r
        groups += [prompt * 10 + 3] * k  # non-contiguous ids
    # interleave the groups so the function cannot rely on contiguity
    perm = torch.randperm(len(scores), generator=g).tolist()
    scores = [scores[i] for i in perm]
    ranks = [ranks[i] for i in perm]
    groups = [groups[i] for i in perm]

    ref_loss, ref_n, ref_acc, ref_margin = _loop_rm_loss(scores, ranks, groups)
    s = torch.tensor(scores, dtype=torch.float64, requires_grad=True)
    loss, stats = rm_ranking_loss(s, torch.tensor(ranks), torch.tensor(groups))
    assert loss.item() == pytest.approx(ref_loss, rel=1e-5)
    assert stats["n_pairs"] == ref_n == sum(math.comb(k, 2) for k in range(2, 10)) - 2
    assert stats["accuracy"] == pytest.approx(ref_acc)
    assert stats["margin"] == pytest.approx(ref_margin, rel=1e-5)
    loss.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_rm_loss_all_tie_group_is_skipped():
    # group 0 all tied: no pair, must not dilute the mean over groups
    scores = torch.tensor([0.3, -0.2, 1.0, 0.0])
    ranks = torch.tensor([1, 1, 0, 1])
    groups = torch.tensor([0, 0, 1, 1])
    loss, stats = rm_ranking_loss(scores, ranks, groups)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.0)), rel=1e-6)
    assert stats["n_pairs"] == 1


def test_rm_loss_stable_for_large_margins():
    loss, stats = rm_ranking_loss(
        torch.tensor([-200.0, 200.0]), torch.tensor([0, 1]), torch.tensor([0, 0])
    )
    assert loss.item() == pytest.approx(400.0, rel=1e-5)
    assert stats["accuracy"] == 0.0


def test_rm_bias_centres_demonstrations():
    demo = torch.tensor([1.0, 2.0, 6.0])
    b = rm_bias(demo)
    assert b == pytest.approx(-3.0)
    assert (demo + b).mean().item() == pytest.approx(0.0)


# ---------------------------------------------------------------- token stats


def test_logprobs_and_entropy_vs_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g)
    tokens = torch.randint(0, 11, (3, 5), generator=g)
    ref = torch.log_softmax(logits.double(), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(logprobs_from_logits(logits, tokens).double(), ref, atol=1e-5)
    half = logprobs_from_logits(logits.bfloat16(), tokens)
    assert half.dtype == torch.float32
    assert torch.allclose(half.double(), ref, atol=0.1)
    p = torch.softmax(logits.double(), -1)
    ref_h = -(p * p.log()).sum(-1)
    assert torch.allclose(entropy_from_logits(logits).double(), ref_h, atol=1e-5)


def test_tempered_logprobs_and_entropy_vs_a_python_loop():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 7, generator=g) * 3
    tokens = torch.randint(0, 7, (2, 3), generator=g)
    t = 0.7
    lp, ent = logprobs_from_logits(logits, tokens, t), entropy_from_logits(logits, t)
    for b in range(2):
        for i in range(3):
            z = [float(x) / t for x in logits[b, i]]
            norm = math.log(sum(math.exp(x) for x in z))
            probs = [math.exp(x - norm) for x in z]
            assert lp[b, i].item() == pytest.approx(z[tokens[b, i]] - norm, abs=1e-5)
            assert ent[b, i].item() == pytest.approx(-sum(q * math.log(q) for q in probs), abs=1e-5)
    assert not torch.allclose(lp, logprobs_from_logits(logits, tokens), atol=0.05)  # T really applies
    # half precision divides after the upcast, as the sampler does
    torch.testing.assert_close(logprobs_from_logits(logits.bfloat16(), tokens, t),
                               logprobs_from_logits(logits.bfloat16().float(), tokens, t))
    # float64 stays float64, so a float64 learner's loss is float64 end to end
    assert logprobs_from_logits(logits.double(), tokens, t).dtype == torch.float64
    assert entropy_from_logits(logits.double(), t).dtype == torch.float64


# ---------------------------------------------------------------- PPO


def test_policy_loss_clipping_both_signs():
    # ratios e^{log r}: 1.5 (A>0: clipped to 1.2), 0.5 (A<0: clipped to 0.8),
    # 1.5 with A<0 (unclipped wins), 0.5 with A>0 (unclipped wins), 1.1 inside
    ratios = torch.tensor([[1.5, 0.5, 1.5, 0.5, 1.1, 3.0]])
    adv = torch.tensor([[1.0, -1.0, -2.0, 2.0, 1.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])  # last column is padding
    old = torch.zeros_like(ratios)
    new = ratios.log().requires_grad_(True)
    loss, stats = policy_loss(new, old, adv, mask, clip=0.2)
    # per-token: max(-A r, -A clip(r))
    expected = [-1.2, 0.8, 3.0, -1.0, -1.1]
    assert loss.item() == pytest.approx(sum(expected) / 5, rel=1e-6)
    assert stats["clipfrac"] == pytest.approx(2 / 5)
    assert stats["ratio_mean"] == pytest.approx((1.5 + 0.5 + 1.5 + 0.5 + 1.1) / 5, rel=1e-6)
    r = torch.tensor([1.5, 0.5, 1.5, 0.5, 1.1])
    assert stats["approx_kl"] == pytest.approx(((r - 1) - r.log()).mean().item(), rel=1e-6)
    loss.backward()
    # clipped tokens and padding get no gradient; the others get -A r / n
    grad = new.grad[0]
    assert grad[0] == 0 and grad[1] == 0 and grad[5] == 0
    assert grad[2].item() == pytest.approx(2.0 * 1.5 / 5, rel=1e-6)
    assert grad[3].item() == pytest.approx(-2.0 * 0.5 / 5, rel=1e-6)


def test_policy_loss_ignores_garbage_under_padding():
    new = torch.tensor([[0.1, 50.0]])
    old = torch.tensor([[0.0, -50.0]])  # exp(100) would overflow in fp32 math
    loss, stats = policy_loss(new, old, torch.tensor([[1.0, 1.0]]), torch.tensor([[1, 0]]))
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(-math.exp(0.1), rel=1e-6)


def test_value_loss_clipping():
    old = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    values = torch.tensor([[1.0, -1.0, 0.1, 1.0]], requires_grad=True)
    returns = torch.tensor([[2.0, 0.5, 0.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, stats = value_loss(values, old, returns, mask, clip=0.2)
    # token 0: v=1 (err 1), v_clip=0.2 (err 3.24) -> 3.24 (clipped branch)
    # token 1: v=-1 (err 2.25), v_clip=-0.2 (err 0.49) -> 2.25
    # token 2: inside the clip range -> 0.01
    assert loss.item() == pytest.approx(0.5 * (3.24 + 2.25 + 0.01) / 3, rel=1e-6)
    assert stats["vf_clipfrac"] == pytest.approx(1 / 3)
    loss.backward()
    assert values.grad[0, 0] == 0 and values.grad[0, 3] == 0
    assert values.grad[0, 1].item() == pytest.approx((-1.0 - 0.5) / 3, rel=1e-6)


# ---------------------------------------------------------------- ptx


def test_ptx_loss_vs_cross_entropy_on_unpadded_rows():
    g = torch.Generator().manual_seed(0)
    v = 13
    pad = eos = 2  # pad id == eos id: only loss_mask decides
    lengths = [6, 4, 3]
    t = max(lengths)
    ids = torch.full((3, t), pad)
    mask = torch.zeros(3, t)
    for b, n in enumerate(lengths):
        ids[b, :n] = torch.randint(3, v, (n,), generator=g)
        ids[b, n - 1] = eos
        mask[b, :n] = 1
    logits = torch.randn(3, t, v, generator=g)
    loss = ptx_lm_loss(logits, ids, mask)
    # reference: each row cut to its length, loss summed over all targets / count
    total, count = 0.0, 0
    for b, n in enumerate(lengths):
        ce = F.cross_entropy(logits[b, : n - 1], ids[b, 1:n], reduction="sum")
        total += ce.item()
        count += n - 1
    assert loss.item() == pytest.approx(total / count, rel=1e-5)
    loss64 = ptx_lm_loss(logits.double(), ids, mask)
    assert loss64.dtype == torch.float64 and loss64.item() == pytest.approx(total / count, rel=1e-6)


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 99.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert explained_variance(returns.clone(), returns, mask) == pytest.approx(1.0)
    values = torch.tensor([[2.0, 2.0, 2.0, 0.0]])  # the mean: explains nothing
    assert explained_variance(values, returns, mask) == pytest.approx(0.0, abs=1e-6)
    assert math.isnan(explained_variance(values, torch.ones(1, 4), mask))
