"""The quantized types lowbit stores: integer grids (int8, uint8, int4, uint4) and float casts."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.errors import InvalidRecipeError


@dataclass(frozen=True)
class QType:
    """A target number type: its bit width, integer range, and the torch dtype that stores it.

    int4/uint4 values are held one per int8/uint8 element in memory and packed two per byte on disk.
    """

    name: str
    bits: int
    is_float: bool
    storage_dtype: torch.dtype
    qmin: int = 0
    qmax: int = 0

    @property
    def is_signed(self) -> bool:
        return self.qmin < 0

    @property
    def symmetric_qmax(self) -> int:
        """Largest magnitude used by symmetric quantization (127 for int8, 7 for int4)."""
        return 2 ** (self.bits - 1) - 1


INT8 = QType("int8", 8, False, torch.int8, -128, 127)
UINT8 = QType("uint8", 8, False, torch.uint8, 0, 255)
INT4 = QType("int4", 4, False, torch.int8, -8, 7)
UINT4 = QType("uint4", 4, False, torch.uint8, 0, 15)
# 5-bit values (llama.cpp's Q5_0) are held one per byte; only a GGUF file packs them
INT5 = QType("int5", 5, False, torch.int8, -16, 15)
UINT5 = QType("uint5", 5, False, torch.uint8, 0, 31)
FP16 = QType("fp16", 16, True, torch.float16)
BF16 = QType("bf16", 16, True, torch.bfloat16)

# 7-bit activations for int8 kernels on CPUs without VNNI (see lowbit.nn.kernels); not a weight type.
UINT7 = QType("uint7", 7, False, torch.uint8, 0, 127)

QTYPES: dict[str, QType] = {t.name: t for t in (INT8, UINT8, INT5, UINT5, INT4, UINT4, FP16, BF16)}


def get_qtype(name: str | QType) -> QType:
    """Look a type up by name, with a clear error listing the known names."""
    if isinstance(name, QType):
        return name
    try:
        return QTYPES[name]
    except KeyError:
        raise InvalidRecipeError(
            f"unknown quantized type {name!r}; choose one of {', '.join(QTYPES)}"
        ) from None
