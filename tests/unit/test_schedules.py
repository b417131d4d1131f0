"""LR multipliers at the paper's key points, and through a real optimizer."""

import math

import pytest
import torch

from rlhf.schedules import cosine_to_fraction, lambda_lr, warmup_then_constant


def test_cosine_key_points():
    assert cosine_to_fraction(0, 100) == pytest.approx(1.0)
    assert cosine_to_fraction(50, 100) == pytest.approx(0.55)  # halfway: (1 + 0.1) / 2
    assert cosine_to_fraction(100, 100) == pytest.approx(0.1)
    assert cosine_to_fraction(250, 100) == pytest.approx(0.1)
    assert cosine_to_fraction(25, 100, final_fraction=0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    values = [cosine_to_fraction(s, 40) for s in range(41)]
    assert all(a > b for a, b in zip(values, values[1:]))  # strictly decreasing, no warmup
    with pytest.raises(ValueError):
        cosine_to_fraction(0, 0)


def test_warmup_key_points():
    assert warmup_then_constant(0) == pytest.approx(0.1)
    assert warmup_then_constant(5) == pytest.approx(0.55)
    assert warmup_then_constant(9) == pytest.approx(0.1 + 0.9 * 0.9)
    assert warmup_then_constant(10) == 1.0
    assert warmup_then_constant(1000) == 1.0
    assert warmup_then_constant(3, warmup_iters=0) == 1.0


def test_lambda_lr_drives_optimizer():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    sched = lambda_lr(opt, warmup_then_constant, warmup_iters=4, start_fraction=0.25)
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.5, 0.875, 1.25, 1.625, 2.0, 2.0])
    # picklable state (no lambdas)
    state = sched.state_dict()
    assert state["last_epoch"] == 6

    opt2 = torch.optim.SGD([p], lr=1.0)
    cos = lambda_lr(opt2, cosine_to_fraction, total_steps=10)
    for _ in range(10):
        opt2.step()
        cos.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.1)
