"""The learners' gradient buckets: what capture, absorb and sq_norm report, against float64
references computed from the parameters' own .grad, on a parameter larger than one
sum-of-squares piece (SQ_CHUNK) so the pieces and their float64 total are exercised.
Each piece sums in float32: agreement to 1e-6, where a lost piece misses by far more."""
from __future__ import annotations

import pytest
import torch

from actors.group import SQ_CHUNK, BucketedGrads, sq_sum


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    # 1100 x 1000 weights: 1.1M elements, more than one piece
    return torch.nn.Sequential(torch.nn.Linear(1000, 1100), torch.nn.Tanh(), torch.nn.Linear(1100, 3))


def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1).double() for p in model.parameters()])


@pytest.mark.parametrize("n", [1, SQ_CHUNK - 1, SQ_CHUNK, 3 * SQ_CHUNK + 5])
def test_sq_sum_matches_a_float64_sum(n):
    t = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 0.01
    ref = float(t.double().pow(2).sum())
    assert float(sq_sum(t)) == pytest.approx(ref, rel=1e-6)


def test_capture_absorb_and_norm_report_each_pass_and_the_total():
    model = _model()
    assert max(p.numel() for p in model.parameters()) > SQ_CHUNK
    grads = BucketedGrads(list(model.named_parameters()), cap_bytes=2 << 20)  # several buckets
    x = torch.randn(8, 1000, generator=torch.Generator().manual_seed(1))

    model(x).pow(2).mean().backward()
    first = _grads(model)
    grads.capture()
    assert float(grads.sq_norm()) == pytest.approx(float(first.pow(2).sum()), rel=1e-6)

    (3 * model(x[:4]).sum()).backward()  # accumulates into the same .grad, as the ptx pass does
    total = _grads(model)
    added = grads.absorb()
    assert added == pytest.approx(float((total - first).pow(2).sum()), rel=1e-6)
    assert added > 0.1 * float(first.pow(2).sum())  # the second pass is not negligible
    assert float(grads.sq_norm()) == pytest.approx(float(total.pow(2).sum()), rel=1e-6)
    flat = torch.cat([b.double() for b in grads.buffers])
    assert flat.numel() == total.numel()
    assert torch.equal(torch.sort(flat).values, torch.sort(total).values)  # the buffers hold the total


def test_write_back_scales_into_grad():
    model = _model()
    grads = BucketedGrads(list(model.named_parameters()))
    model(torch.randn(2, 1000)).sum().backward()
    before = _grads(model)
    grads.capture()
    grads.write_back(0.5)
    assert torch.equal(_grads(model), (before.float() * 0.5).double())
