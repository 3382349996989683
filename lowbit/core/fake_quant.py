"""Fake quantization for training: round onto a grid and back in float, with gradients that pass
the rounding (the straight-through estimator of Bengio et al., 2013).

The forward values are those `quantize_with` and `QuantizedTensor.dequantize` give, operation
for operation, so a model trained on them converts to integer modules with the same numbers.
Gradients reach the scale too (LSQ, Esser et al., 2020) when it is a tensor that requires them.
"""

from __future__ import annotations

import torch

from lowbit.core.granularity import Granularity
from lowbit.core.qtypes import QType
from lowbit.core.quantize import from_blocks, grid_bounds, on_scale_grid, to_blocks


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward; the identity's gradient backward."""
    return x + (torch.round(x) - x).detach()


def on_scale_grid_ste(scale: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """A learned scale held to the values `scale_dtype` stores (float16 for GGUF's blocks)
    forward, its gradient passed straight through."""
    return scale + (on_scale_grid(scale.detach(), scale_dtype) - scale).detach()


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    qtype: QType,
    granularity: Granularity,
    symmetric: bool,
) -> torch.Tensor:
    """`x` rounded onto the grid of `scale`/`zero_point` and read back, differentiably: equal to
    `QuantizedTensor(quantize_with(x, ...), scale, zero_point, ...).dequantize()`. Values clamped
    at the ends of the grid get no gradient, as in LSQ."""
    blocks = to_blocks(x.float(), granularity)
    scales = scale.reshape(-1, 1)
    zeros = None if zero_point is None else zero_point.reshape(-1, 1).to(blocks.dtype)
    low, high = grid_bounds(qtype, symmetric)
    q = blocks / scales
    if zeros is not None and zero_point.is_floating_point():  # a float zero point: round after adding
        q = round_ste(q + zeros)
    elif zeros is not None:
        q = round_ste(q) + zeros
    else:
        q = round_ste(q)
    q = torch.clamp(q, low, high)
    if zeros is not None:
        q = q - zeros
    return from_blocks(q * scales, x.shape, granularity)


def fake_quantize_rows(x: torch.Tensor, qmax: int) -> torch.Tensor:
    """Each row of a 2-D input onto its own unsigned grid [0, qmax] over [min, max] and back, as
    the dynamic scheme rounds a Linear's input per token (lowbit.nn.kernels.reference)."""
    low = x.amin(dim=1, keepdim=True)
    span = (x.amax(dim=1, keepdim=True) - low).clamp(min=torch.finfo(torch.float32).tiny)
    normalized = (x - low) / span
    step = 1.0 / qmax
    rounded = torch.clamp(round_ste(normalized / step), 0, qmax) * step
    return low + span * rounded


def fake_quantize_tensor(x: torch.Tensor, scale: float, zero_point: int, qmax: int) -> torch.Tensor:
    """`x` onto one calibrated unsigned grid [0, qmax] and back (a static module's input or
    output), its gradient passed inside the grid."""
    q = torch.clamp(round_ste(x / scale) + zero_point, 0, qmax)
    return (q - zero_point) * scale


def fake_quantize_range(x: torch.Tensor, bounds: torch.Tensor, qmax: int) -> torch.Tensor:
    """`x` onto the unsigned grid [0, qmax] that `qparams_from_range` sets over `bounds` (low,
    high; widened to include 0) and back: the values `fake_quantize_tensor` gives on that grid,
    with gradients reaching the bounds too (through the scale, as LSQ's, and through the zero
    point and the ends values are clamped to), so a static grid can learn its range."""
    low, high = torch.clamp(bounds[0], max=0.0), torch.clamp(bounds[1], min=0.0)
    scale = (high - low) / qmax
    scale = on_scale_grid_ste(torch.where(scale != 0, scale, torch.ones_like(scale)), torch.float32)
    zero_point = torch.clamp(-round_ste(low / scale), 0, qmax)
    q = torch.clamp(round_ste(x / scale) + zero_point, 0, qmax)
    return (q - zero_point) * scale
