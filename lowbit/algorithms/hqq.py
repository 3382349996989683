"""HQQ: half-quadratic quantization. Without calibration data, choose each group's zero point so
that the rounding error is small in an lp norm with p < 1, which tolerates the few large errors
of outlier weights and drives the many small ones to zero.

Badri and Shaji, "Half-Quadratic Quantization of Large Machine Learning Models" (2023). With the
scale s of each group fixed from its range, the zero point z (a float, not a grid level) solves

    min_z  ||W − (round(W / s + z) − z) · s||_p^p,   p = 0.7,

by half-quadratic splitting: an auxiliary error E takes the lp term, and the two alternate, as
in the reference implementation:

    Q = clamp(round(W / s + z)),  E = shrink_p(W − (Q − z) · s, β),  z = mean(Q − (W − E) / s),

shrink_p(x, β) = sign(x) · max(|x| − |x|^(p−1) / β, 0) (the lp proximal step), β growing by κ
each step. It stops when the mean absolute error stops falling and keeps the best zero points.
Data-free, so it costs seconds; the float zero points are what it needs (rounded to the grid, the
gain is lost), so its specs store them as floats (LayerSpec.zero_point). Grids with no zero point
to optimise (symmetric, 8-bit) are rounded to nearest.
"""

from __future__ import annotations

import torch

from lowbit.algorithms import ALGORITHMS, Algorithm
from lowbit.core import Granularity, QuantizedTensor
from lowbit.core.qtypes import get_qtype
from lowbit.core.quantize import (
    ROUNDED_AT_ONCE,
    check_finite,
    on_scale_grid,
    quantize_with,
    scale_shape,
    to_blocks,
)
from lowbit.nn.qweight import round_to_nearest, storage_qtype
from lowbit.nn.spec import LayerSpec

P = 0.7  # the lp norm's exponent
BETA, KAPPA = 10.0, 1.01  # the splitting's starting weight and its growth per step
ITERATIONS = 20


def _shrink(error: torch.Tensor, beta: float) -> torch.Tensor:
    """The proximal step of |x|^p: small errors go to zero, large ones are kept (less 1/β·|x|^(p−1))."""
    magnitude = error.abs()
    return torch.sign(error) * torch.relu(magnitude - magnitude.add(1e-8).pow(P - 1) / beta)


def optimal_zero_points(blocks: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                        qmax: int) -> torch.Tensor:
    """Zero points (one per row of `blocks`) minimising the rows' lp rounding error at `scale`."""
    scale, best, best_error, beta = scale.reshape(-1, 1), zero.reshape(-1, 1), float("inf"), BETA
    current = best
    for _ in range(ITERATIONS):
        codes = torch.round(blocks / scale + current).clamp_(0, qmax)
        error = blocks - (codes - current) * scale
        mean_error = float(error.abs().mean())
        if mean_error >= best_error:
            break
        best, best_error = current, mean_error
        current = torch.mean(codes - (blocks - _shrink(error, beta)) / scale, dim=1, keepdim=True)
        beta *= KAPPA
    return best.reshape(-1)


def hqq(weight: torch.Tensor, spec: LayerSpec) -> QuantizedTensor:
    """`weight` on `spec`'s grid with HQQ's zero points (round-to-nearest without float zero points)."""
    if spec.zero_point != "float":
        return round_to_nearest(weight, spec)
    check_finite(weight)
    qtype, granularity = get_qtype(storage_qtype(spec)), Granularity.parse(spec.granularity)
    blocks = to_blocks(weight.detach().float(), granularity)
    low, high = blocks.amin(dim=1), blocks.amax(dim=1)
    width = high - low
    scale = on_scale_grid(torch.where(width > 0, width / qtype.qmax, torch.ones_like(width)),
                          spec.torch_scale_dtype)
    zero = torch.empty_like(scale)
    rows = max(1, ROUNDED_AT_ONCE // blocks.shape[1])
    for start in range(0, blocks.shape[0], rows):  # each chunk optimised on its own: bounded memory
        end = start + rows
        initial = torch.round(-low[start:end] / scale[start:end])
        zero[start:end] = optimal_zero_points(blocks[start:end], scale[start:end], initial, qtype.qmax)
    shape = scale_shape(weight.shape, granularity)
    scale, zero = scale.reshape(shape), zero.reshape(shape)
    data = quantize_with(weight, scale, zero, qtype, granularity, symmetric=False)
    return QuantizedTensor(data, scale, zero, qtype, granularity)


ALGORITHMS.add("hqq", Algorithm(hqq, float_zero_points=True))
