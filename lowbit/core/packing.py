"""Bit packing: two 4-bit values per byte, low nibble first, so int4 weights take half a byte."""

from __future__ import annotations

import torch

from lowbit.errors import QuantizationError


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """Pack unsigned 4-bit values (0..15) along the last dimension, which must be even."""
    if values.shape[-1] % 2:
        raise QuantizationError(f"cannot pack int4 along a dimension of odd size {values.shape[-1]}")
    nibbles = values.to(torch.uint8)
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4`: uint8 bytes to unsigned 4-bit values (uint8, last dim doubled)."""
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)
