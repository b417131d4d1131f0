"""The decoupled PPO objective of asynchronous rollouts (rlhf/off_policy.py), against references
computed another way: a per-token loop, and the exact policy gradient of a small bandit."""
from __future__ import annotations

import math

import pytest
import torch

from rlhf.losses import policy_loss
from rlhf.off_policy import behaviour_weights


def _batch(seed: int = 0, b: int = 3, t: int = 7):
    g = torch.Generator().manual_seed(seed)
    logp = torch.randn(b, t, generator=g, dtype=torch.float64) * 0.3 - 2.0
    prox = logp + torch.randn(b, t, generator=g, dtype=torch.float64) * 0.2
    behav = prox + torch.randn(b, t, generator=g, dtype=torch.float64) * 0.5
    adv = torch.randn(b, t, generator=g, dtype=torch.float64)
    mask = torch.ones(b, t)
    mask[0, 5:] = 0
    mask[2, :2] = 0
    return logp.requires_grad_(), prox, behav, adv, mask


def test_weights_are_the_truncated_probability_ratio_token_by_token():
    _, prox, behav, _, mask = _batch()
    cap = 1.5
    w, stats = behaviour_weights(prox, behav, mask, cap)
    raws, cut = [], 0
    for i in range(mask.shape[0]):
        for j in range(mask.shape[1]):
            if mask[i, j]:
                raw = math.exp(prox[i, j].item()) / math.exp(behav[i, j].item())
                raws.append(raw)
                cut += raw > cap
                assert w[i, j].item() == pytest.approx(min(raw, cap), rel=1e-6)
            else:
                assert w[i, j].item() == 1.0
    assert stats["behaviour_weight_mean"] == pytest.approx(sum(raws) / len(raws), rel=1e-6)
    assert stats["behaviour_weight_max"] == pytest.approx(max(raws), rel=1e-6)
    assert stats["behaviour_weights_truncated"] == pytest.approx(cut / len(raws))
    assert 0 < cut < len(raws)  # the cap really cut some and left others


def test_decoupled_loss_and_gradient_match_a_per_token_loop():
    logp, prox, behav, adv, mask = _batch(1)
    w, _ = behaviour_weights(prox, behav, mask, cap=2.0)
    loss, stats = policy_loss(logp, prox, adv, mask, clip=0.2, weights=w)
    loss.backward()
    want_loss, want_grad, n = 0.0, torch.zeros_like(logp), mask.sum().item()
    for i in range(mask.shape[0]):
        for j in range(mask.shape[1]):
            if not mask[i, j]:
                continue
            r = math.exp(logp[i, j].item() - prox[i, j].item())
            a, wij = adv[i, j].item(), w[i, j].item()
            unclipped, clipped = -a * r, -a * min(max(r, 0.8), 1.2)
            want_loss += wij * max(unclipped, clipped) / n
            # d/dlogp of -A r is -A r; the clipped branch is flat once it binds
            if unclipped >= clipped:
                want_grad[i, j] = wij * -a * r / n
    assert loss.item() == pytest.approx(want_loss, rel=1e-9)
    torch.testing.assert_close(logp.grad, want_grad, rtol=1e-9, atol=1e-12)
    assert 0 < stats["clipfrac"] < 1


def test_unit_weights_and_no_weights_are_the_same_loss_bit_for_bit():
    logp, prox, _, adv, mask = _batch(2)
    plain, _ = policy_loss(logp.float(), prox.float(), adv.float(), mask)
    ones, _ = policy_loss(logp.float(), prox.float(), adv.float(), mask, weights=torch.ones_like(mask))
    assert torch.equal(plain, ones)


def test_weighted_samples_of_a_stale_policy_estimate_the_on_policy_gradient():
    """A 6-armed bandit: tokens drawn from an old policy pi_b, PPO at pi = pi_prox (ratio 1,
    no clipping). With the weights the sample gradient is the exact on-policy gradient
    sum_a pi_prox(a) A(a) grad log pi(a); without them it is pi_b's, measurably different."""
    torch.manual_seed(0)
    theta = torch.tensor([0.5, -0.3, 1.2, 0.0, -1.0, 0.4], dtype=torch.float64, requires_grad=True)
    behav_logits = theta.detach() + torch.tensor([-1.0, 0.8, -0.7, 0.5, 1.0, -0.4], dtype=torch.float64)
    adv_of_arm = torch.tensor([1.0, -0.5, 0.8, -1.2, 0.3, 0.1], dtype=torch.float64)
    prox = torch.log_softmax(theta.detach(), 0)
    exact = torch.autograd.grad((prox.exp() * adv_of_arm * torch.log_softmax(theta, 0)).sum(), theta)[0]

    n = 400_000
    arms = torch.multinomial(torch.softmax(behav_logits, 0), n, replacement=True)
    logp = torch.log_softmax(theta, 0)[arms].view(1, n)
    old, behav = prox[arms].view(1, n), torch.log_softmax(behav_logits, 0)[arms].view(1, n)
    adv, mask = adv_of_arm[arms].view(1, n), torch.ones(1, n)

    def gradient(weights):
        loss, _ = policy_loss(logp, old, adv, mask, clip=0.2, weights=weights)
        return -torch.autograd.grad(loss, theta, retain_graph=True)[0]  # ascent direction

    w, stats = behaviour_weights(old, behav, mask, cap=100.0)  # no truncation at these ratios
    assert stats["behaviour_weights_truncated"] == 0 and stats["behaviour_weight_mean"] == pytest.approx(1, abs=0.01)
    corrected, uncorrected = gradient(w), gradient(None)
    error, bias = (corrected - exact).abs().max(), (uncorrected - exact).abs().max()
    assert error < 0.01 and bias > 5 * error, (error, bias)  # the bias is what the correction removes
