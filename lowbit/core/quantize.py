"""Scale / zero-point math and (de)quantization at per-tensor, per-channel and per-group granularity.

Affine quantization as in Jacob et al. (2018): q = clamp(round(x / scale) + zero_point), and
x ≈ (q - zero_point) * scale. Symmetric mode fixes zero_point at the type's midpoint. A grid with a
minimum (llama.cpp's Q4_1) offsets the levels by a float instead: x ≈ q * scale + minimum.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.core.granularity import Granularity
from lowbit.core.qtypes import QType, get_qtype
from lowbit.errors import QuantizationError

ROUNDED_AT_ONCE = 1 << 22  # elements `quantize_with` rounds per step (a 16 MB float temporary)


@dataclass
class QuantizedTensor:
    """Integer values (one per element, original shape) plus the scale and zero point (or
    minimum) to read them."""

    data: torch.Tensor
    scale: torch.Tensor | None
    zero_point: torch.Tensor | None
    qtype: QType
    granularity: Granularity
    minimum: torch.Tensor | None = None  # x = q * scale + minimum; no zero point then

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.qtype.is_float:
            return self.data.to(dtype)
        blocks = to_blocks(self.data, self.granularity).to(dtype)  # a fresh tensor: safe in place
        if self.zero_point is not None:
            blocks.sub_(self.zero_point.reshape(-1, 1))
        blocks.mul_(self.scale.reshape(-1, 1))
        if self.minimum is not None:  # as a separate add, the order GGUF's readers compute in
            blocks.add_(self.minimum.reshape(-1, 1).to(dtype))
        return from_blocks(blocks, self.data.shape, self.granularity)


def to_blocks(x: torch.Tensor, granularity: Granularity) -> torch.Tensor:
    """Reshape so that each row holds the elements that share one scale."""
    if granularity.kind == "per_tensor":
        return x.reshape(1, -1)
    if granularity.kind == "per_channel":
        axis = granularity.axis % x.dim()
        moved = x if axis == 0 else x.movedim(axis, 0)
        return moved.reshape(x.shape[axis], -1)
    if x.dim() == 0 or x.shape[-1] % granularity.group_size:
        raise QuantizationError(
            f"group size {granularity.group_size} does not divide the input dimension "
            f"{x.shape[-1] if x.dim() else 0} of a tensor of shape {tuple(x.shape)}; "
            "pick a group size that divides it, or use per_channel"
        )
    return x.reshape(-1, granularity.group_size)


def from_blocks(blocks: torch.Tensor, shape: torch.Size, granularity: Granularity) -> torch.Tensor:
    """Inverse of `to_blocks`."""
    if granularity.kind == "per_channel" and granularity.axis % len(shape) != 0:
        axis = granularity.axis % len(shape)
        moved = (shape[axis], *shape[:axis], *shape[axis + 1 :])
        return blocks.reshape(moved).movedim(0, axis)
    return blocks.reshape(shape)


def scale_shape(shape: torch.Size, granularity: Granularity) -> tuple[int, ...]:
    """Shape of the scale tensor for a tensor of `shape` (what is saved to disk)."""
    if granularity.kind == "per_tensor":
        return ()
    if granularity.kind == "per_channel":
        return (shape[granularity.axis % len(shape)],)
    return (*shape[:-1], shape[-1] // granularity.group_size)


def qparams_from_range(
    low: torch.Tensor, high: torch.Tensor, qtype: QType, symmetric: bool,
    scale_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point that map [low, high] (widened to include 0) onto the type's grid.

    Returns zero_point None in symmetric mode with a signed type (it is 0). A zero-width range
    gets scale 1 so that all-zero tensors quantize exactly. A symmetric grid of an unsigned
    type may have a negative scale (see `_midpoint_scale`). With `scale_dtype` float16, each scale
    is a float16 value (held in float32), as GGUF's blocks store it, and the zero point and the
    integers are chosen for that scale.
    """
    low = torch.clamp(low.float(), max=0.0)
    high = torch.clamp(high.float(), min=0.0)
    if symmetric and not qtype.is_signed:
        scale = _midpoint_scale(low, high, qtype)
        zero_point = torch.full_like(scale, 2 ** (qtype.bits - 1))
    elif symmetric:
        scale = torch.maximum(-low, high) / qtype.symmetric_qmax
        zero_point = None
    else:
        scale = (high - low) / (qtype.qmax - qtype.qmin)
        zero_point = None
    scale = torch.where(scale != 0, scale, torch.ones_like(scale))
    scale = on_scale_grid(scale, scale_dtype)
    if not symmetric:
        zero_point = torch.clamp(qtype.qmin - torch.round(low / scale), qtype.qmin, qtype.qmax)
    return scale, None if zero_point is None else zero_point.to(torch.int32)


def minimum_qparams_from_range(
    low: torch.Tensor, high: torch.Tensor, qtype: QType, scale_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and minimum of a grid x = q * scale + minimum (q in 0..qmax of an unsigned type)
    spanning [low, high], both held in `scale_dtype` as llama.cpp's Q4_1 blocks hold them. Unlike
    a zero point, the minimum need not be a level of an integer grid through 0, so the range is
    not widened to include 0. A zero-width range gets scale 1 (its values are the minimum)."""
    low, high = low.float(), high.float()
    minimum = on_value_grid(low, scale_dtype)
    scale = (high - minimum) / qtype.qmax
    scale = on_scale_grid(torch.where(scale > 0, scale, torch.ones_like(scale)), scale_dtype)
    return scale, minimum


def on_value_grid(values: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """`values` as `scale_dtype` holds them (float16: nearest, within its finite range), in float32."""
    if scale_dtype == torch.float16:
        largest = torch.finfo(torch.float16).max
        return values.float().clamp(-largest, largest).to(torch.float16).float()
    return values.float()


def _midpoint_scale(low: torch.Tensor, high: torch.Tensor, qtype: QType) -> torch.Tensor:
    """Scale of a symmetric grid stored unsigned around its midpoint (int4 as 0..15, zero point
    8): such a grid has one more level below the midpoint (−8) than above (+7). As in llama.cpp's
    Q4_0, the value of largest magnitude goes to that extra level whatever its sign (a negative
    scale flips the grid), so a block's step is 1/8 of its largest magnitude where the other
    side fits in 7 steps; unlike Q4_0's, the step grows where it does not, so nothing clips.
    On SmolLM2's weights at groups of 32 this cuts the squared rounding error by a quarter."""
    mid = 2 ** (qtype.bits - 1)
    flip = high >= -low  # the extreme is positive: a negative scale puts it on -mid
    extreme, opposite = torch.where(flip, high, -low), torch.where(flip, -low, high)
    magnitude = torch.maximum(extreme / mid, opposite / (mid - 1))
    return torch.where(flip, -magnitude, magnitude)


def on_scale_grid(scale: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """Non-zero scales, their sign kept, whose magnitude `scale_dtype` holds exactly (float16: its
    nearest value, from its smallest subnormal to its largest finite), as float32."""
    tiny, largest = torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max
    magnitude = scale.abs()
    if scale_dtype == torch.float16:
        tiny, largest = 2.0**-24, torch.finfo(torch.float16).max
        magnitude = magnitude.clamp(tiny, largest).to(torch.float16).float()
    elif scale_dtype != torch.float32:
        raise QuantizationError(f"scales are stored in float32 or float16, not {scale_dtype}")
    return torch.where(scale < 0, -1.0, 1.0) * torch.clamp(magnitude, min=tiny, max=largest)


def compute_qparams(
    x: torch.Tensor, qtype: QType | str, granularity: Granularity | str, symmetric: bool,
    scale_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point from the min/max of each block of `x`, shaped as `scale_shape`."""
    qtype, granularity = get_qtype(qtype), Granularity.parse(granularity)
    blocks = to_blocks(x.detach().float(), granularity)
    scale, zero_point = qparams_from_range(blocks.amin(dim=1), blocks.amax(dim=1), qtype, symmetric,
                                           scale_dtype)
    shape = scale_shape(x.shape, granularity)
    return scale.reshape(shape), None if zero_point is None else zero_point.reshape(shape)


def compute_minimum_qparams(
    x: torch.Tensor, qtype: QType, granularity: Granularity, scale_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and minimum from the min/max of each block of `x`, shaped as `scale_shape`."""
    blocks = to_blocks(x.detach().float(), granularity)
    scale, minimum = minimum_qparams_from_range(blocks.amin(dim=1), blocks.amax(dim=1), qtype, scale_dtype)
    shape = scale_shape(x.shape, granularity)
    return scale.reshape(shape), minimum.reshape(shape)


def check_finite(x: torch.Tensor, what: str = "tensor") -> None:
    """Refuse NaN/Inf early: they would silently poison every scale computed from them. (Checked a
    chunk at a time: `isfinite` of a whole tensor takes twice its size in temporaries.)"""
    flat = x.detach().reshape(-1)
    if x.is_floating_point() and not all(bool(torch.isfinite(flat[start:start + ROUNDED_AT_ONCE]).all())
                                         for start in range(0, flat.numel(), ROUNDED_AT_ONCE)):
        raise QuantizationError(
            f"{what} contains NaN or Inf values; fix the model's weights before quantizing"
        )


def grid_bounds(qtype: QType, symmetric: bool) -> tuple[int, int]:
    """The lowest and highest integer a grid uses: ±symmetric_qmax for a symmetric signed grid
    (no −128 for int8), else the type's whole range."""
    if symmetric and qtype.is_signed:
        return -qtype.symmetric_qmax, qtype.symmetric_qmax
    return qtype.qmin, qtype.qmax


def quantize_with(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    qtype: QType,
    granularity: Granularity,
    symmetric: bool,
    minimum: torch.Tensor | None = None,
) -> torch.Tensor:
    """Round `x` onto the grid given by `scale` and `zero_point` (or `minimum`), clamped to the
    type's range."""
    blocks = to_blocks(x.detach().float(), granularity)
    scales = scale.reshape(-1, 1)
    zeros = None if zero_point is None else zero_point.reshape(-1, 1)
    offsets = None if minimum is None else minimum.reshape(-1, 1)
    low, high = grid_bounds(qtype, symmetric)
    out = torch.empty(blocks.shape, dtype=qtype.storage_dtype)
    rows = max(1, ROUNDED_AT_ONCE // max(blocks.shape[1], 1))
    for start in range(0, blocks.shape[0], rows):  # one float temporary of a chunk, not of all of x
        end = start + rows
        q = blocks[start:end] if offsets is None else blocks[start:end] - offsets[start:end]
        q = q / scales[start:end]
        if zeros is not None and zeros.is_floating_point():  # a float zero point (HQQ's): round after
            q.add_(zeros[start:end]).round_()
        elif zeros is not None:
            q.round_().add_(zeros[start:end])
        else:
            q.round_()
        out[start:end] = q.clamp_(low, high)
    return from_blocks(out, x.shape, granularity)


def quantize_tensor(
    x: torch.Tensor,
    qtype: QType | str,
    granularity: Granularity | str = "per_tensor",
    symmetric: bool = True,
    scale_dtype: torch.dtype = torch.float32,
    minimum: bool = False,
) -> QuantizedTensor:
    """Quantize `x` by round-to-nearest with scales from its own min/max (held in `scale_dtype`);
    with `minimum`, on an unsigned grid offset by each block's minimum (llama.cpp's Q4_1)."""
    qtype, granularity = get_qtype(qtype), Granularity.parse(granularity)
    check_finite(x)
    if qtype.is_float:
        limit = torch.finfo(qtype.storage_dtype).max
        if x.numel() and float(x.detach().abs().max()) > limit:
            raise QuantizationError(f"values exceed the {qtype.name} range (±{limit:g})")
        return QuantizedTensor(x.detach().to(qtype.storage_dtype), None, None, qtype, granularity)
    if minimum:
        if qtype.is_signed or symmetric:
            raise QuantizationError(f"a grid with a minimum is asymmetric and unsigned, not {qtype.name}")
        scale, offset = compute_minimum_qparams(x, qtype, granularity, scale_dtype)
        data = quantize_with(x, scale, None, qtype, granularity, False, minimum=offset)
        return QuantizedTensor(data, scale, None, qtype, granularity, minimum=offset)
    scale, zero_point = compute_qparams(x, qtype, granularity, symmetric, scale_dtype)
    data = quantize_with(x, scale, zero_point, qtype, granularity, symmetric)
    return QuantizedTensor(data, scale, zero_point, qtype, granularity)
