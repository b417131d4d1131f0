"""KL-shaped rewards and GAE vs hand-worked values and scalar per-row loops."""

import pytest
import torch

from rlhf.advantages import gae, kl_shaped_rewards


def _loop_gae(rewards, values, mask, gamma, lam):
    """Reference: textbook GAE on each row's valid tokens alone, scattered back."""
    adv = torch.zeros_like(rewards, dtype=torch.float64)
    for b in range(rewards.shape[0]):
        idx = [t for t in range(rewards.shape[1]) if mask[b, t]]
        r = [float(rewards[b, t]) for t in idx]
        v = [float(values[b, t]) for t in idx]
        running = 0.0
        for k in reversed(range(len(idx))):
            next_v = v[k + 1] if k + 1 < len(idx) else 0.0
            delta = r[k] + gamma * next_v - v[k]
            running = delta + gamma * lam * running
            adv[b, idx[k]] = running
    return adv


def _mixed_padding_mask():
    # right padding of different lengths, left-padded rows, a full row, and a
    # hole (padding is skipped, not treated as an episode end)
    return torch.tensor(
        [
            [1, 1, 1, 1, 1, 1, 1],
            [1, 1, 1, 0, 0, 0, 0],
            [1, 0, 0, 0, 0, 0, 0],
            [0, 0, 1, 1, 1, 1, 1],
            [0, 0, 0, 1, 1, 0, 0],
            [1, 0, 1, 1, 0, 1, 0],
        ]
    )


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0), (1.0, 0.0)])
def test_gae_matches_loop(gamma, lam):
    g = torch.Generator().manual_seed(0)
    mask = _mixed_padding_mask()
    rewards = torch.randn(mask.shape, generator=g)
    values = torch.randn(mask.shape, generator=g)
    # garbage under padding must not matter
    rewards = torch.where(mask.bool(), rewards, torch.tensor(float("nan")))
    values = torch.where(mask.bool(), values, torch.tensor(1e6))
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    ref = _loop_gae(rewards, values, mask, gamma, lam)
    assert torch.allclose(adv.double(), ref, atol=1e-5)
    ref_ret = torch.where(mask.bool(), ref + values.double(), torch.zeros((), dtype=torch.float64))
    assert torch.allclose(ret.double(), ref_ret, atol=1e-4)
    assert torch.all(adv[~mask.bool()] == 0) and torch.all(ret[~mask.bool()] == 0)


def test_gae_hand_worked():
    # one row of 3 valid tokens then padding, gamma=1, lam=0.5
    rewards = torch.tensor([[0.0, 0.0, 1.0, 5.0]])
    values = torch.tensor([[0.5, 0.25, 0.5, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # delta2 = 1 + 0 - 0.5 = 0.5               A2 = 0.5
    # delta1 = 0 + 0.5 - 0.25 = 0.25           A1 = 0.25 + 0.5*0.5 = 0.5
    # delta0 = 0 + 0.25 - 0.5 = -0.25          A0 = -0.25 + 0.5*0.5 = 0.0
    assert adv.tolist() == [[0.0, 0.5, 0.5, 0.0]]
    assert ret.tolist() == [[0.5, 0.75, 1.0, 0.0]]


def test_gae_lambda_one_gamma_one_is_reward_to_go_minus_value():
    mask = _mixed_padding_mask()
    g = torch.Generator().manual_seed(3)
    rewards = torch.randn(mask.shape, generator=g) * mask
    values = torch.randn(mask.shape, generator=g)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    to_go = rewards.flip(1).cumsum(1).flip(1) * mask  # pads hold 0 reward
    assert torch.allclose(ret, to_go, atol=1e-5)


def test_kl_shaped_rewards_hand_worked():
    # pad id == eos id (0) in the tokens: the mask alone says where rows end
    pad = eos = 0
    tokens = torch.tensor([[pad, 4, 5, eos, pad], [pad, pad, 6, 7, eos]])
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]])
    assert tokens[0, 3] == tokens[0, 4]  # an id-based rule would get this wrong
    logprobs = torch.tensor([[9.0, -1.0, -2.0, -0.5, 9.0], [9.0, 9.0, -1.0, -1.0, -3.0]])
    ref = torch.tensor([[-9.0, -1.5, -1.0, -1.0, -9.0], [-9.0, -9.0, -2.0, -1.0, -1.0]])
    rm = torch.tensor([2.0, -1.0])
    rewards, kl = kl_shaped_rewards(logprobs, ref, rm, mask, kl_coef=0.1)
    assert torch.allclose(kl, torch.tensor([[0.0, 0.5, -1.0, 0.5, 0.0], [0.0, 0.0, 1.0, 0.0, -2.0]]))
    expected = torch.tensor(
        [
            [0.0, -0.05, 0.1, -0.05 + 2.0, 0.0],
            [0.0, 0.0, -0.1, 0.0, 0.2 - 1.0],
        ]
    )
    assert torch.allclose(rewards, expected, atol=1e-6)


def test_kl_shaped_rewards_matches_loop():
    g = torch.Generator().manual_seed(1)
    mask = _mixed_padding_mask()
    lp = torch.randn(mask.shape, generator=g)
    ref_lp = torch.randn(mask.shape, generator=g)
    rm = torch.randn(mask.shape[0], generator=g)
    rewards, kl = kl_shaped_rewards(lp, ref_lp, rm, mask, kl_coef=0.02)
    for b in range(mask.shape[0]):
        last = max(t for t in range(mask.shape[1]) if mask[b, t])
        for t in range(mask.shape[1]):
            if not mask[b, t]:
                exp_r, exp_kl = 0.0, 0.0
            else:
                exp_kl = float(lp[b, t] - ref_lp[b, t])
                exp_r = -0.02 * exp_kl + (float(rm[b]) if t == last else 0.0)
            assert rewards[b, t].item() == pytest.approx(exp_r, abs=1e-6)
            assert kl[b, t].item() == pytest.approx(exp_kl, abs=1e-6)
