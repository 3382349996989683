"""GPTQ: round a Linear's weight column by column, each column's rounding error spread over the
columns not yet rounded, weighted by the inverse Hessian of the layer's inputs.

Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers" (ICLR 2023), Algorithm 1. The layer's output error on calibration inputs X is
||W X - Q X||², whose Hessian in each row of W is H = 2 X Xᵀ / n. Rounding column i moves the
output by (w_i - q_i) x_i; the optimal update of the columns after it (Optimal Brain Surgeon)
is -(w_i - q_i) / [H⁻¹]_ii · [H⁻¹]_i,i+1:, which needs only the upper Cholesky factor of H⁻¹.

Choices, as in the reference implementation:
- damping: `DAMP` × the mean of diag(H) is added to the diagonal (H is singular when an input
  channel is constant or the calibration text is short);
- act-order: columns are rounded in order of decreasing diag(H), the channels with the largest
  inputs first, while their errors can still be absorbed;
- static groups: each group's scale and zero point are fixed from the original weight before any
  update, so the groups keep lowbit's layout (consecutive input columns) whatever the order.
  Each group's range is shrunk by the factor in `SHRINKS` that minimises its rounding error
  weighted by diag(H) (the "scale estimation" NNCF adds to GPTQ): a range set by one outlier
  weight wastes levels on every other weight of the group;
- lazy batches: columns are processed in blocks of `BLOCK`, the updates to later blocks applied
  once per block as one matrix product.
"""

from __future__ import annotations

import torch

from lowbit.algorithms import ALGORITHMS, Algorithm
from lowbit.core import Granularity, QuantizedTensor
from lowbit.core.quantize import minimum_qparams_from_range, qparams_from_range, quantize_with, to_blocks
from lowbit.errors import QuantizationError
from lowbit.nn.qweight import round_to_nearest
from lowbit.nn.spec import LayerSpec

DAMP = 0.01
BLOCK = 128
SHRINKS = torch.linspace(1.0, 0.7, 13)  # fractions of a group's range tried for its grid


def _grid_error(weight: torch.Tensor, grid: QuantizedTensor, importance: torch.Tensor) -> torch.Tensor:
    """Per group: the squared rounding error of each weight, times its column's importance."""
    error = (weight - grid.dequantize()) ** 2 * importance
    return to_blocks(error, grid.granularity).sum(dim=1)


def searched_grid(weight: torch.Tensor, spec: LayerSpec, importance: torch.Tensor) -> QuantizedTensor:
    """Round-to-nearest on the grid whose every group's range is shrunk by the factor in SHRINKS
    with the least importance-weighted rounding error (the full range is among them, so no group
    gets worse than round-to-nearest's)."""
    best = round_to_nearest(weight, spec)
    if best.qtype.is_float:
        return best
    blocks = to_blocks(weight, best.granularity)
    low, high = blocks.min(dim=1).values, blocks.max(dim=1).values
    best_error = _grid_error(weight, best, importance)
    kept = {field: getattr(best, field) for field in GRID_FIELDS}
    for shrink in SHRINKS[1:]:
        trial = _nearest_on_range(weight, low * shrink, high * shrink, best, spec)
        error = _grid_error(weight, trial, importance)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        kept = {field: None if value is None else
                torch.where(better, getattr(trial, field).reshape(-1), value.reshape(-1)).reshape(value.shape)
                for field, value in kept.items()}
    scale, zero, minimum = (kept[field] for field in GRID_FIELDS)
    data = quantize_with(weight, scale, zero, best.qtype, best.granularity, spec.symmetric, minimum)
    return QuantizedTensor(data, scale, zero, best.qtype, best.granularity, minimum)


GRID_FIELDS = ("scale", "zero_point", "minimum")  # what a group's grid is, one value per group


def _nearest_on_range(weight: torch.Tensor, low: torch.Tensor, high: torch.Tensor, like: QuantizedTensor,
                      spec: LayerSpec) -> QuantizedTensor:
    """`weight` rounded to nearest on the grids (of `like`'s kind) spanning [low, high] per group."""
    zero = minimum = None
    if like.minimum is not None:
        scale, minimum = minimum_qparams_from_range(low, high, like.qtype, spec.torch_scale_dtype)
    else:
        scale, zero = qparams_from_range(low, high, like.qtype, spec.symmetric, spec.torch_scale_dtype)
    data = quantize_with(weight, scale, zero, like.qtype, like.granularity, spec.symmetric, minimum)
    return QuantizedTensor(data, scale, zero, like.qtype, like.granularity, minimum)


def _column_grid(grid: QuantizedTensor, rows: int, columns: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero point) of every weight entry as (rows, columns) matrices, from the grid's
    one-per-block values (zero point 0 where the grid has none; a minimum m as the float zero
    point −m / scale, the same levels)."""
    shape = to_blocks(torch.empty(rows, columns), grid.granularity).shape
    scale = grid.scale.reshape(-1, 1).expand(shape)
    if grid.minimum is not None:
        zero = (-grid.minimum.double() / grid.scale.double()).reshape(-1, 1).expand(shape)
    elif grid.zero_point is not None:
        zero = grid.zero_point.reshape(-1, 1).expand(shape).float()
    else:
        zero = torch.zeros(shape)
    return scale.reshape(rows, columns), zero.reshape(rows, columns)


def inverse_hessian_factor(hessian: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of the damped Hessian's inverse, in float64 for stability."""
    if not bool(torch.isfinite(hessian).all()):
        raise QuantizationError("the calibration inputs give a Hessian with NaN or Inf values")
    hessian = hessian.double().clone()
    damping = DAMP * hessian.diagonal().mean().clamp_min(1e-8)
    hessian += damping * torch.eye(hessian.shape[0], dtype=torch.float64)
    try:
        inverse = torch.cholesky_inverse(torch.linalg.cholesky(hessian))
        return torch.linalg.cholesky(inverse, upper=True)
    except torch.linalg.LinAlgError:
        raise QuantizationError("the damped Hessian is not positive definite; use more "
                                "calibration text, or round-to-nearest for this layer") from None


def gptq(weight: torch.Tensor, spec: LayerSpec, hessian: torch.Tensor) -> QuantizedTensor:
    """`weight` on `spec`'s grid, rounded by GPTQ: a Linear's (out, in) against `hessian` (in, in),
    a convolution's (out, in / groups, kh, kw) against its patches' Hessian, (groups, columns,
    columns) for a grouped one, each group's output channels against their own inputs."""
    if weight.dim() == 2 and hessian.dim() == 2:
        return _gptq_rows(weight, spec, hessian)
    rows = weight.reshape(weight.shape[0], -1)
    hessians = hessian.reshape(-1, rows.shape[1], rows.shape[1])
    if rows.shape[0] % hessians.shape[0]:
        raise QuantizationError(f"a weight of {rows.shape[0]} rows cannot split into "
                                f"{hessians.shape[0]} groups of inputs")
    if Granularity.parse(spec.granularity).kind != "per_channel":
        raise QuantizationError("GPTQ rounds a convolution's weight per output channel only")
    parts = [_gptq_rows(part, spec, group_hessian)
             for part, group_hessian in zip(rows.chunk(hessians.shape[0]), hessians, strict=True)]
    shape = round_to_nearest(weight, spec)
    return QuantizedTensor(torch.cat([part.data for part in parts]).reshape(weight.shape),
                           _joined(parts, "scale", shape.scale),
                           _joined(parts, "zero_point", shape.zero_point),
                           shape.qtype, shape.granularity)


def _joined(parts: list[QuantizedTensor], field: str, like: torch.Tensor | None) -> torch.Tensor | None:
    """The groups' per-channel scales (or zero points) as one tensor shaped as `like`."""
    if like is None:
        return None
    return torch.cat([getattr(part, field).reshape(-1) for part in parts]).reshape(like.shape)


def _gptq_rows(weight: torch.Tensor, spec: LayerSpec, hessian: torch.Tensor) -> QuantizedTensor:
    """`weight` (rows, in) on `spec`'s grid, rounded by GPTQ against `hessian` (in, in)."""
    importance = hessian.diagonal().float().clamp_min(0).reshape(1, -1)
    grid = searched_grid(weight.float(), spec, importance)  # static groups, fixed before any update
    signed = spec.symmetric and grid.qtype.is_signed  # lowbit's symmetric grids are ±qmax
    qmin, qmax = (-grid.qtype.symmetric_qmax, grid.qtype.symmetric_qmax) if signed else (
        grid.qtype.qmin, grid.qtype.qmax)
    rows, columns = weight.shape
    scale, zero = _column_grid(grid, rows, columns)
    work = weight.detach().double().clone()
    hessian = hessian.double().clone()
    dead = hessian.diagonal() == 0  # inputs always zero in calibration: rounded to nearest, as
    hessian[dead, dead] = 1.0  # they may not be zero later (the reference zeroes their weights)
    order = torch.argsort(hessian.diagonal(), descending=True)
    work, scale, zero = work[:, order], scale[:, order].double(), zero[:, order].double()
    factor = inverse_hessian_factor(hessian[order][:, order])
    codes = torch.empty(rows, columns, dtype=torch.float64)
    for start in range(0, columns, BLOCK):
        end = min(start + BLOCK, columns)
        block, errors = work[:, start:end].clone(), torch.zeros(rows, end - start, dtype=torch.float64)
        local = factor[start:end, start:end]
        for i in range(end - start):
            column = start + i
            code = torch.clamp(torch.round(block[:, i] / scale[:, column] + zero[:, column]), qmin, qmax)
            codes[:, column] = code
            error = (block[:, i] - (code - zero[:, column]) * scale[:, column]) / local[i, i]
            block[:, i:] -= error[:, None] * local[i, i:][None, :]
            errors[:, i] = error
        work[:, end:] -= errors @ factor[start:end, end:]
    data = torch.empty_like(codes)
    data[:, order] = codes
    return QuantizedTensor(data.to(grid.data.dtype), grid.scale, grid.zero_point, grid.qtype,
                           grid.granularity, grid.minimum)


ALGORITHMS.add("gptq", Algorithm(gptq, needs_hessian=True))
