"""LoRA's sparse dropout: the same distribution as nn.Dropout, drawn as the dropped positions."""

from __future__ import annotations

import math

import pytest
import torch

from llavactl.model import dropout
from llavactl.model.dropout import SparseDropout, dropped_positions


def test_each_position_is_dropped_independently_with_probability_p():
    torch.manual_seed(0)
    n, p = 2_000_000, 0.3
    mask = torch.zeros(n, dtype=torch.bool)
    mask[dropped_positions(n, p)] = True
    # Within 5 standard deviations of Binomial(n, p) and, for neighbours, of Binomial(n-1, p^2).
    assert abs(int(mask.sum()) - n * p) < 5 * math.sqrt(n * p * (1 - p))
    pairs = int((mask[1:] & mask[:-1]).sum())
    assert abs(pairs - (n - 1) * p**2) < 5 * math.sqrt(n * p**2 * (1 - p**2))
    # The share dropped is the same in both halves: no drift along the tensor.
    halves = mask.view(2, -1).float().mean(dim=1)
    assert abs(float(halves[0] - halves[1])) < 5 * math.sqrt(2 * p * (1 - p) / (n / 2))


@pytest.mark.parametrize(("n", "p"), [(1, 0.5), (10, 1e-9), (7, 0.999999), (1000, 0.05), (4096, 0.5)])
def test_positions_are_distinct_sorted_and_inside(n: int, p: float):
    torch.manual_seed(1)
    positions = dropped_positions(n, p)
    assert positions.dtype == torch.int64
    assert bool((positions[1:] > positions[:-1]).all())
    assert all(0 <= int(x) < n for x in positions)
    if p > 0.99:
        assert positions.tolist() == list(range(n))
    if p < 1e-6:
        assert positions.tolist() == []


def test_drawing_in_small_chunks_gives_the_same_positions(monkeypatch: pytest.MonkeyPatch):
    torch.manual_seed(2)
    whole = dropped_positions(5000, 0.05)
    monkeypatch.setattr(dropout, "chunk_size", lambda n, p: 3)
    torch.manual_seed(2)
    chunked = dropped_positions(5000, 0.05)
    assert len(whole) > 200
    assert torch.equal(chunked, whole)


def test_kept_values_are_scaled_dropped_ones_are_zero_and_so_are_their_gradients():
    torch.manual_seed(3)
    x = torch.randn(4, 50, 30, requires_grad=True)
    out = SparseDropout(0.2).train()(x)
    dropped = out == 0
    assert 0.1 < float(dropped.float().mean()) < 0.3
    assert torch.allclose(out[~dropped], x[~dropped] / 0.8)
    out.sum().backward()
    assert torch.equal(x.grad, (~dropped).float() / 0.8)


def test_seeded_draws_repeat_and_eval_mode_or_p_zero_pass_through():
    x = torch.randn(8, 64)
    layer = SparseDropout(0.1).train()
    torch.manual_seed(4)
    first = layer(x)
    torch.manual_seed(4)
    assert torch.equal(layer(x), first)
    assert not torch.equal(layer(x), first)
    assert layer.eval()(x) is x
    assert torch.equal(SparseDropout(0.0).train()(x), x)

