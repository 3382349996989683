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
from lowbit.errors import QuantizationError
from lowbit.nn.spec import LayerSpec

UNSIGNED_STORAGE = {"int4": "uint4", "int5": "uint5"}


def storage_qtype(spec: LayerSpec) -> str:
    """int4 and int5 weights are stored unsigned (0..15 or 0..31, zero point 8 or 16 when
    symmetric), so int4 packs simply and both read as MatMulNBits and GGUF blocks do."""
    return UNSIGNED_STORAGE.get(spec.weight, spec.weight)


def round_to_nearest(weight: torch.Tensor, spec: LayerSpec) -> QuantizedTensor:
    """`weight` on `spec`'s grid, each value rounded to the nearest level with scales (and zero
    points) from its own range: what a module stores when no algorithm rounded it."""
    return quantize_tensor(weight, storage_qtype(spec), spec.granularity, spec.symmetric,
                           spec.torch_scale_dtype, minimum=spec.zero_point == "minimum")


class QuantizedWeightMixin:
    """Registers `weight` (packed two per byte for 4-bit), `weight_scale` and `weight_zero_point`
    (or `weight_minimum`)."""

    spec: LayerSpec
    weight_shape: tuple[int, ...]
    kind: str  # "linear", "conv" or "embedding": what LayerSpec.problem checks against

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
        if spec.zero_point == "minimum":
            self.register_buffer("weight_minimum", torch.zeros(scales))
            return
        has_zero_point = not (spec.symmetric and qtype.is_signed)
        if has_zero_point:
            dtype = torch.float32 if spec.zero_point == "float" else torch.int32
            self.register_buffer("weight_zero_point", torch.zeros(scales, dtype=dtype))

    def _store_weight(self: nn.Module, weight: torch.Tensor, rounded: QuantizedTensor | None = None) -> None:
        """Store a weight an algorithm already rounded (lowbit.algorithms), or else round this
        float weight to nearest."""
        self.store_quantized(rounded if rounded is not None else round_to_nearest(weight, self.spec))

    def store_quantized(self: nn.Module, quantized: QuantizedTensor) -> None:
        """Take values already rounded by an algorithm (RTN, GPTQ, ...) into the buffers."""
        if (quantized.minimum is None) != (getattr(self, "weight_minimum", None) is None):
            has = "with" if quantized.minimum is not None else "without"
            raise QuantizationError(f"a grid {has} a minimum cannot be stored in a module whose spec's zero "
                                    f"point is {self.spec.zero_point!r}")
        data = pack_int4(quantized.data) if quantized.qtype.bits == 4 else quantized.data
        self.weight.copy_(data)
        if quantized.scale is not None:
            self.weight_scale.copy_(quantized.scale)
        if quantized.zero_point is not None:
            self.weight_zero_point.copy_(quantized.zero_point)
        if quantized.minimum is not None:
            self.weight_minimum.copy_(quantized.minimum)

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
            getattr(self, "weight_minimum", None),
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
        grids = (("input", input_range, UINT8 if self.spec.input_qmax == UINT8.qmax else UINT7),
                 ("output", output_range, UINT8))
        for name, (low, high), qtype in grids:
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

    def loaded_problem(self: nn.Module) -> str | None:
        """Why tensors and spec loaded from a file cannot run (a scale or zero point off its grid,
        an unknown kernel), or None. Shapes and dtypes are the loader's to check against the
        skeleton first."""
        problem = self.spec.problem(self.kind, self.weight_shape)
        if problem:
            return problem
        qtype = get_qtype(storage_qtype(self.spec))
        scale = getattr(self, "weight_scale", None)
        if scale is not None:
            problem = self._scale_problem(scale, flippable=self.spec.symmetric and not qtype.is_signed)
            if problem:
                return problem
        minimum = getattr(self, "weight_minimum", None)
        if minimum is not None and not (bool(torch.isfinite(minimum).all()) and torch.equal(
                minimum.to(self.spec.torch_scale_dtype).float(), minimum)):
            return f"a weight minimum is not a finite {self.spec.scale_dtype} value, as the spec says"
        zero_point = getattr(self, "weight_zero_point", None)
        if zero_point is not None and zero_point.is_floating_point():
            if not bool(torch.isfinite(zero_point).all()):
                return "a weight zero point is NaN or infinite"
        elif zero_point is not None and zero_point.numel() and not (
                qtype.qmin <= int(zero_point.min()) and int(zero_point.max()) <= qtype.qmax):
            return f"a weight zero point lies outside {qtype.name}'s range"
        if self.spec.scheme == "static":
            for side, qmax in (("input", self.spec.input_qmax), ("output", UINT8.qmax)):
                side_scale = float(getattr(self, f"{side}_scale"))
                side_zero = int(getattr(self, f"{side}_zero_point"))
                if not (side_scale > 0 and side_scale < float("inf")) or not 0 <= side_zero <= qmax:
                    return f"the {side} scale or zero point is off its grid"
        return self.kernel_problem()

    def _scale_problem(self, scale: torch.Tensor, flippable: bool) -> str | None:
        """Scales are finite and positive; negative too where they flip a symmetric grid stored
        unsigned (lowbit.core.quantize); float16 values where the spec says so."""
        magnitude = scale.abs() if flippable else scale
        if not bool(torch.isfinite(scale).all() and (magnitude > 0).all()):
            return f"a weight scale is not a {'non-zero' if flippable else 'positive'} finite number"
        if not torch.equal(scale.to(self.spec.torch_scale_dtype).float(), scale):
            return f"a weight scale is not a {self.spec.scale_dtype} value, as the spec says"
        return None

    def kernel_problem(self) -> str | None:
        """Why the recorded kernels do not fit this module, or None (per module class)."""
        return None

    def use_available_kernels(self) -> list[str]:
        """Swap recorded kernels this PyTorch build lacks for the reference; returns those swapped."""
        return []

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.quantized_weight().dequantize(dtype)

    def weight_bytes(self) -> int:
        """Bytes of every buffer this module stores (weights, scales, zero points, bias)."""
        return sum(b.numel() * b.element_size() for b in self.buffers(recurse=False))
