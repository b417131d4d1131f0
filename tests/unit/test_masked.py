"""Masked reductions vs the same statistics computed on the valid values alone."""

import pytest
import torch

from rlhf.masked import (global_share, last_valid_index, masked_count, masked_mean, masked_sum, masked_var,
                         masked_whiten)

# row 0 right-padded, row 1 left-padded, row 2 full, row 3 a hole in the middle
MASK = torch.tensor(
    [
        [1, 1, 1, 0, 0],
        [0, 0, 1, 1, 1],
        [1, 1, 1, 1, 1],
        [1, 0, 1, 1, 0],
    ],
    dtype=torch.float32,
)


def _x() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(MASK.shape, generator=g) * 3 + 2
    # garbage under padding must never leak into results
    return torch.where(MASK.bool(), x, torch.tensor(float("nan")))


def _valid(x: torch.Tensor) -> list[float]:
    return [float(x[b, t]) for b in range(x.shape[0]) for t in range(x.shape[1]) if MASK[b, t]]


def test_sum_and_mean_match_valid_values():
    x = _x()
    vals = _valid(x)
    assert masked_sum(x, MASK).item() == pytest.approx(sum(vals), rel=1e-5)
    assert masked_mean(x, MASK).item() == pytest.approx(sum(vals) / len(vals), rel=1e-5)
    for b in range(x.shape[0]):
        row = [float(x[b, t]) for t in range(x.shape[1]) if MASK[b, t]]
        assert masked_sum(x, MASK, dim=1)[b].item() == pytest.approx(sum(row), rel=1e-5)
        assert masked_mean(x, MASK, dim=1)[b].item() == pytest.approx(sum(row) / len(row), rel=1e-5)


def test_bool_mask_equals_float_mask():
    x = _x()
    assert torch.equal(masked_mean(x, MASK.bool()), masked_mean(x, MASK))


def test_var_matches_valid_values():
    x = _x()
    vals = torch.tensor(_valid(x))
    assert masked_var(x, MASK).item() == pytest.approx(vals.var(unbiased=False).item(), rel=1e-5)
    assert masked_var(x, MASK, unbiased=True).item() == pytest.approx(vals.var(unbiased=True).item(), rel=1e-5)


def test_whiten_ignores_pads():
    x = _x()
    vals = torch.tensor(_valid(x))
    ref = (vals - vals.mean()) / torch.sqrt(vals.var(unbiased=False) + 1e-8)
    out = masked_whiten(x, MASK)
    assert torch.allclose(torch.tensor(_valid(out)), ref, atol=1e-5)
    assert torch.all(out[~MASK.bool()] == 0)
    # changing padded values changes nothing
    x2 = torch.where(MASK.bool(), x, torch.tensor(1e6))
    assert torch.allclose(masked_whiten(x2, MASK), out)


def test_whiten_without_shift_keeps_mean():
    x = _x()
    vals = torch.tensor(_valid(x))
    ref = (vals - vals.mean()) / torch.sqrt(vals.var(unbiased=False) + 1e-8) + vals.mean()
    out = masked_whiten(x, MASK, shift_mean=False)
    assert torch.allclose(torch.tensor(_valid(out)), ref, atol=1e-5)
    assert torch.all(out[~MASK.bool()] == 0)


def test_last_valid_index_any_padding_side():
    assert last_valid_index(MASK).tolist() == [2, 4, 4, 3]
    # reference by scanning each row
    g = torch.Generator().manual_seed(1)
    m = torch.rand(16, 9, generator=g) > 0.5
    m[:, 0] = True
    ref = [max(t for t in range(9) if m[b, t]) for b in range(16)]
    assert last_valid_index(m).tolist() == ref


def test_last_valid_index_ignores_token_ids():
    # pad id == eos id == 0: the ids alone cannot tell the final EOS from padding
    pad = eos = 0
    ids = torch.tensor([[5, 6, eos, pad, pad], [pad, 7, 8, 9, eos]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]])
    assert last_valid_index(mask).tolist() == [2, 4]
    assert ids[0, 2] == ids[0, 3]  # same id, different validity


def test_last_valid_index_empty_row_raises():
    with pytest.raises(ValueError):
        last_valid_index(torch.tensor([[1, 0], [0, 0]]))


def test_var_too_few_raises():
    with pytest.raises(ValueError):
        masked_var(torch.ones(1, 3), torch.tensor([[0, 1, 0]]), unbiased=True)


@pytest.mark.parametrize("cuts", [[1, 3], [2], [1, 2, 3]])
def test_global_share_turns_averaged_local_means_into_the_global_token_mean(cuts):
    # shards of MASK's rows with different token counts (3, 3, 5, 3); what a mean
    # all-reduce of the workers' scaled local means gives vs the mean of all valid values
    x = _x().double()
    bounds = [0, *cuts, x.shape[0]]
    parts = [(x[a:b], MASK[a:b]) for a, b in zip(bounds, bounds[1:])]
    world, total = len(parts), masked_count(MASK)
    averaged = sum(masked_mean(xi, mi) * global_share(masked_count(mi), total, world)
                   for xi, mi in parts) / world
    vals = _valid(x)
    assert averaged.item() == pytest.approx(sum(vals) / len(vals), rel=1e-12)
    plain = sum(masked_mean(xi, mi) for xi, mi in parts) / world  # per-worker means, averaged
    assert abs(plain.item() - sum(vals) / len(vals)) > 1e-3


def test_global_share_edge_cases():
    assert global_share(7, 7, 1) == 1.0  # one worker: exactly the local mean
    assert global_share(0, 5, 2) == 0.0  # an empty shard adds nothing
    assert global_share(3, 0, 2) == 0.0  # an empty global batch: no gradient, not a division by 0
