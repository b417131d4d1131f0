import random

import numpy as np
import torch

from rlhf.config import OptimizerConfig
from rlhf.models import load_state_file
from rlhf.train_state import make_optimizer, restore, snapshot


def _draws():
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_snapshot_round_trips_through_a_weights_only_load(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = make_optimizer(model.parameters(), 0.1, OptimizerConfig())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (step + 1))
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched.step()
    torch.save(snapshot(model, opt, sched, version=7), tmp_path / "s.pt")
    after = _draws()  # what the random streams give next, from the snapshot's point on
    weights = {k: v.clone() for k, v in model.state_dict().items()}

    fresh = torch.nn.Linear(3, 2)
    fresh_opt = make_optimizer(fresh.parameters(), 0.1, OptimizerConfig())
    fresh_sched = torch.optim.lr_scheduler.LambdaLR(fresh_opt, lambda step: 1.0 / (step + 1))
    extra = restore(load_state_file(tmp_path / "s.pt"), fresh, fresh_opt, fresh_sched)  # weights_only=True

    assert extra == {"version": 7}
    assert _draws() == after  # python, numpy and torch streams all resumed
    assert all(torch.equal(fresh.state_dict()[k], w) for k, w in weights.items())
    assert fresh_sched.get_last_lr() == sched.get_last_lr()
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
