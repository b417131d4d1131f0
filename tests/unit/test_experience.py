"""build_experience: shaping, GAE and whitening composed as the paper's loop needs."""
import torch

from rlhf.experience import Rollout, build_experience


def _rollout():
    # row 0: 2 prompt tokens (left padded by 1), 3 response tokens
    # row 1: 3 prompt tokens, 1 response token, then right padding
    attn = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    act = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 0, 0]])
    return Rollout(torch.zeros(2, 6, dtype=torch.long), attn, act, torch.zeros(2, 6), ["a", "b"], 7)


def test_advantages_are_whitened_returns_are_not_and_version_carries():
    r = _rollout()
    g = torch.Generator().manual_seed(0)
    lp, ref, v = torch.randn(2, 6, generator=g), torch.randn(2, 6, generator=g), torch.randn(2, 6, generator=g)
    exp, stats = build_experience(r, lp, ref, v, torch.tensor([1.0, -2.0]), kl_coef=0.1, gamma=1.0, lam=1.0)
    valid = r.action_mask.bool()
    assert abs(exp.advantages[valid].mean()) < 1e-6
    assert abs(exp.advantages[valid].std(unbiased=False) - 1) < 1e-4
    assert (exp.advantages[~valid] == 0).all() and exp.weight_version == 7
    # gamma = lambda = 1: return at each valid token = sum of the remaining rewards of its row
    kl = (lp - ref) * r.action_mask
    rewards = -0.1 * kl
    rewards[0, 5] += 1.0
    rewards[1, 3] += -2.0
    for b in range(2):
        for t in range(6):
            if valid[b, t]:
                assert torch.isclose(exp.returns[b, t], rewards[b, t:].sum(), atol=1e-5)
    assert abs(stats["kl_per_sequence"] - kl.sum(1).mean().item()) < 1e-5
    assert stats["response_length"] == 2.0
