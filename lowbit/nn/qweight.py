"""Quantized weight storage shared by QLinear, QConv2d and QEmbedding: buffers that save as-is."""

from __future__ import annotations

import torch
from torch import nn

from lowbit.core import (
    Granularity,
    QuantizedTensor,
    get_qtype,
    pack_int4,
    quantize_tensor,
    unpack_int4,
)
from lowbit.core.qtypes import UINT7, UINT8
from lowbit.core.quantize import qparams_from_range, scale_shape
from lowbit.nn.spec import LayerSpec


def storage_qtype(spec: LayerSpec) -> str:
    """int4 weights are stored unsigned (0..15, zero point 8 when symmetric) so they pack simply."""
    return "uint4" if spec.weight == "int4" else spec.weight


class QuantizedWeightMixin:
    """Registers `weight` (packed two per byte for 4-bit), `weight_scale` and `weight_zero_point`."""

    spec: LayerSpec
    weight_shape: tuple[int, ...]

    def _init_weight_buffers(self: nn.Module, spec: LayerSpec, shape: tuple[int, ...]) -> None:
        self.spec = spec
        self.weight_shape = tuple(shape)
        qtype = get_qtype(storage_qtype(spec))
        stored_shape = (*shape[:-1], shape[-1] // 2) if qtype.bits == 4 else shape
        self.register_buffer("weight", torch.zeros(stored_shape, dtype=qtype.storage_dtype))
        if qtype.is_float:
            return
        granularity = Granularity.parse(spec.granularity)
        scales = scale_shape(torch.Size(shape), granularity)
        self.register_buffer("weight_scale", torch.ones(scales))
        has_zero_point = not (spec.symmetric and qtype.is_signed)
        if has_zero_point:
            self.register_buffer("weight_zero_point", torch.zeros(scales, dtype=torch.int32))

    def _store_weight(self: nn.Module, weight: torch.Tensor) -> None:
        """Quantize a float weight by round-to-nearest into the registered buffers."""
        quantized = quantize_tensor(
            weight, storage_qtype(self.spec), self.spec.granularity, self.spec.symmetric
        )
        self.store_quantized(quantized)

    def store_quantized(self: nn.Module, quantized: QuantizedTensor) -> None:
        """Take values already rounded by an algorithm (RTN, GPTQ, ...) into the buffers."""
        data = pack_int4(quantized.data) if quantized.qtype.bits == 4 else quantized.data
        self.weight.copy_(data)
        if quantized.scale is not None:
            self.weight_scale.copy_(quantized.scale)
        if quantized.zero_point is not None:
            self.weight_zero_point.copy_(quantized.zero_point)

    def quantized_weight(self) -> QuantizedTensor:
        """The weight as a QuantizedTensor (int4 unpacked to one value per element)."""
        qtype = get_qtype(storage_qtype(self.spec))
        data = unpack_int4(self.weight) if qtype.bits == 4 else self.weight
        return QuantizedTensor(
            data,
            getattr(self, "weight_scale", None),
            getattr(self, "weight_zero_point", None),
            qtype,
            Granularity.parse(self.spec.granularity),
        )

    def _init_static_activation_buffers(self: nn.Module) -> None:
        """Scale and zero point of the calibrated input (7-bit) and output (8-bit) grids."""
        for name in ("input", "output"):
            self.register_buffer(f"{name}_scale", torch.tensor(1.0))
            self.register_buffer(f"{name}_zero_point", torch.tensor(0, dtype=torch.int32))

    def set_activation_ranges(
        self: nn.Module, input_range: tuple[float, float], output_range: tuple[float, float]
    ) -> None:
        """Static scheme: fix the activation grids from calibrated ranges."""
        for name, (low, high), qtype in (("input", input_range, UINT7), ("output", output_range, UINT8)):
            scale, zero_point = qparams_from_range(torch.tensor(low), torch.tensor(high), qtype,
                                                   symmetric=False)
            getattr(self, f"{name}_scale").copy_(scale)
            getattr(self, f"{name}_zero_point").copy_(zero_point)
        self.kernel_cache.clear()

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        """New tensors invalidate packed weights built from the old ones."""
        if hasattr(self, "kernel_cache"):
            self.kernel_cache.clear()
        super()._load_from_state_dict(*args, **kwargs)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.quantized_weight().dequantize(dtype)

    def weight_bytes(self) -> int:
        """Bytes of every buffer this module stores (weights, scales, zero points, bias)."""
        return sum(b.numel() * b.element_size() for b in self.buffers(recurse=False))
