"""EMA of weights vs a manual loop."""

import pytest
import torch
from torch import nn

from rlhf.ema import EMA


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def test_ema_matches_manual_loop_and_copies_buffers():
    model = _model()
    ema = EMA(model)  # paper default
    assert ema.decay == 0.992
    manual = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(5):
        x = torch.randn(8, 3)
        model(x).pow(2).mean().backward()  # train mode: BatchNorm buffers move too
        opt.step()
        opt.zero_grad()
        ema.update(model)
        for n, p in model.named_parameters():
            manual[n] = 0.992 * manual[n] + 0.008 * p.detach().double()
    for n, s in ema.shadow.items():
        assert s.dtype == torch.float32
        assert torch.allclose(s.double(), manual[n], atol=1e-6), n
    assert ema.num_updates == 5

    target = _model()
    ema.copy_to(target)
    for n, p in target.named_parameters():
        assert torch.allclose(p.double(), manual[n], atol=1e-6)
    for (n, b), (_, b_ref) in zip(target.named_buffers(), model.named_buffers()):
        assert torch.equal(b, b_ref), n
    assert target[1].num_batches_tracked.item() == 5


def test_ema_fp32_shadow_keeps_small_updates_of_bf16_model():
    model = nn.Linear(2, 2, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = EMA(model, decay=0.999)
    with torch.no_grad():
        model.weight.fill_(1.5)
    ema.update(model)
    # 1 + 0.001 * 0.5: representable in fp32, lost in bf16
    assert ema.shadow["weight"][0, 0].item() == pytest.approx(1.0005, abs=1e-6)
    ema.copy_to(model)
    assert model.weight.dtype == torch.bfloat16


def test_ema_state_dict_round_trip():
    model = _model()
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    state = ema.state_dict()
    other = EMA(_model(), decay=0.5)
    other.load_state_dict(state)
    assert other.decay == 0.9 and other.num_updates == 1
    for n in ema.shadow:
        assert torch.equal(other.shadow[n], ema.shadow[n])
    # the saved copy is independent of later updates
    ema.update(model)
    assert not torch.equal(state["shadow"]["0.weight"], ema.shadow["0.weight"])
