"""Fake quantization on a learned range (lowbit.core.fake_quant.fake_quantize_range): the values the
calibrated grid gives, and gradients that reach the range's ends."""

import pytest
import torch

from lowbit.core.fake_quant import fake_quantize_range, fake_quantize_tensor
from lowbit.core.qtypes import UINT7, UINT8
from lowbit.core.quantize import qparams_from_range


@pytest.mark.parametrize("qtype", [UINT8, UINT7], ids=["8-bit", "7-bit"])
@pytest.mark.parametrize("bounds", [(-3.7, 5.1), (0.2, 4.0), (-2.0, -0.5), (0.0, 0.0)])
def test_values_equal_the_calibrated_grids(bounds, qtype):
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 4
    low, high = torch.tensor(bounds[0]), torch.tensor(bounds[1])
    scale, zero_point = qparams_from_range(low, high, qtype, symmetric=False)
    expected = fake_quantize_tensor(x, float(scale), int(zero_point), qtype.qmax)
    assert torch.equal(fake_quantize_range(x, torch.tensor(bounds), qtype.qmax), expected)


def test_gradients_reach_both_ends_of_the_range():
    x = torch.randn(4096, generator=torch.Generator().manual_seed(1)) * 4
    bounds = torch.tensor([-2.0, 3.0], requires_grad=True)
    fake_quantize_range(x, bounds, UINT8.qmax).square().sum().backward()
    assert bool((bounds.grad != 0).all()) and bool(torch.isfinite(bounds.grad).all())
