"""QConv2d: a Conv2d with int8 per-channel weights, weight-only or static (fbgemm `quantized::conv2d`)."""

from __future__ import annotations

import copy
import os
import statistics

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.core import QuantizedTensor
from lowbit.core.quantize import check_finite
from lowbit.core.timing import repeat_seconds
from lowbit.nn.kernels import (
    _quantized_tensor_api,
    cached,
    quantize_static_input,
    static_fake_quantize,
)
from lowbit.nn.qweight import QuantizedWeightMixin
from lowbit.nn.registry import QModuleKind, register_qmodule
from lowbit.nn.spec import LayerSpec


class QConv2d(QuantizedWeightMixin, nn.Module):
    """Drop-in replacement for `nn.Conv2d` (zero padding) with int8 per-output-channel weights.

    Also replaces the "static same padding" Conv2d subclass of EfficientNet/timm, whose forward
    pads with a `static_padding` module first: that module is kept and applied the same way.
    """

    kind = "conv"

    def __init__(self, conv: nn.Conv2d, spec: LayerSpec) -> None:
        super().__init__()
        padding_module = getattr(conv, "static_padding", None)
        self.static_padding = copy.deepcopy(padding_module) if padding_module is not None else None
        self.stride, self.padding = conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_cache: dict = {}
        self._init_weight_buffers(spec, tuple(conv.weight.shape))
        self.register_buffer("bias", None if conv.bias is None else torch.zeros(conv.out_channels))
        if spec.scheme == "static":
            self._init_static_activation_buffers()

    @classmethod
    def from_float(cls, conv: nn.Conv2d, spec: LayerSpec,
                   input_range: tuple[float, float] | None = None,
                   output_range: tuple[float, float] | None = None,
                   input_shape: tuple[int, ...] | None = None,
                   rounded: QuantizedTensor | None = None) -> QConv2d:
        """Quantize a float Conv2d. For the static scheme, fbgemm's int8 convolution is timed
        against the reference on `input_shape` (seen in calibration) and kept only if faster:
        some grouped and strided shapes take slow paths in fbgemm. A convolution on an 8-bit input
        grid runs the reference: fbgemm's int16 pair sums could saturate on it without VNNI."""
        check_finite(conv.weight, "conv weight")
        module = cls(conv, spec)
        module._store_weight(conv.weight.detach().float(), rounded)
        if conv.bias is not None:
            module.bias.copy_(conv.bias.detach().float())
        if spec.scheme == "static":
            module.set_activation_ranges(input_range, output_range)
        fast = _fbgemm_runs(spec) and "fbgemm" in torch.backends.quantized.supported_engines
        kernel = "fbgemm_conv2d" if fast else "reference"
        if fast and input_shape is not None and os.environ.get("LOWBIT_KERNEL") is None:
            kernel = module._faster_kernel(torch.randn(input_shape))
        module.spec = spec.with_kernels({"all": kernel})
        return module

    def _faster_kernel(self, x: torch.Tensor) -> str:
        """"fbgemm_conv2d" or "reference", whichever is faster on `x` (median of 5 after warm-up)."""
        timings = {}
        with torch.inference_mode():
            for name, run in (("fbgemm_conv2d", self.fbgemm_conv2d), ("reference", self.reference)):
                timings[name] = statistics.median(repeat_seconds(lambda run=run: run(self._padded(x)), 5, 1))
        self.kernel_cache.clear()
        return min(timings, key=timings.get)

    def kernel_problem(self) -> str | None:
        allowed = ["reference", *(["fbgemm_conv2d"] if _fbgemm_runs(self.spec) else [])]
        if set(self.spec.kernels) != {"all"} or self.spec.kernels["all"] not in allowed:
            return f"a {self.spec.scheme} convolution runs one of {allowed}, not {self.spec.kernels}"
        return None

    def use_available_kernels(self) -> list[str]:
        """Swap fbgemm for the reference where this PyTorch build lacks it; returns those swapped."""
        available = "fbgemm" in torch.backends.quantized.supported_engines
        if self.spec.kernels.get("all") != "fbgemm_conv2d" or available:
            return []
        self.spec = self.spec.with_kernels({"all": "reference"})
        return ["fbgemm_conv2d"]

    def _padded(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.static_padding is None else self.static_padding(x)

    def _conv(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """Dequantize-then-convolve, with the static scheme's activation rounding."""
        if self.spec.scheme != "static":
            return self._conv(x, self.dequantized_weight(x.dtype))
        x = static_fake_quantize(self, x, "input")
        return static_fake_quantize(self, self._conv(x, self.dequantized_weight(x.dtype)), "output")

    def _prepack(self):
        with _quantized_tensor_api():
            zeros = torch.zeros(self.out_channels, dtype=torch.long)
            qweight = torch._make_per_channel_quantized_tensor(
                self.weight, self.weight_scale.double(), zeros, 0
            )
            return torch.ops.quantized.conv2d_prepack(
                qweight, self.bias, list(self.stride), list(self.padding), list(self.dilation),
                self.groups,
            )

    def fbgemm_conv2d(self, x: torch.Tensor) -> torch.Tensor:
        """fbgemm `quantized::conv2d` on 7-bit activations and int8 per-channel weights."""
        packed = cached(self, "fbgemm", self._prepack)
        qy = torch.ops.quantized.conv2d.new(
            quantize_static_input(self, x), packed, float(self.output_scale), int(self.output_zero_point)
        )
        return qy.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._padded(x)
        if x.device.type == "cpu" and self.spec.kernels.get("all") == "fbgemm_conv2d":
            return self.fbgemm_conv2d(x.float()).to(x.dtype)
        return self.reference(x)


def _fbgemm_runs(spec: LayerSpec) -> bool:
    """fbgemm's int8 convolution computes this spec: static, per-channel, 7-bit input grid."""
    return spec.scheme == "static" and spec.granularity == "per_channel" and spec.input_qmax == 127


def _replaces(module: nn.Module) -> bool:
    """nn.Conv2d with zero padding, and the static-same-padding Conv2d subclass of EfficientNet/timm
    (its forward pads with a `static_padding` module, which QConv2d keeps); other subclasses
    may compute differently and stay in float."""
    padding_module = getattr(module, "static_padding", None)
    same_padding = isinstance(module, nn.Conv2d) and isinstance(padding_module, nn.Module)
    return (type(module) is nn.Conv2d or same_padding) and module.padding_mode == "zeros"


def input_patches(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The patches each output position of `conv` reads from `x`, grouped as its weight is:
    (groups, positions, in_channels / groups x kernel area), in the order of the weight's
    flattened rows (a grouped or depthwise convolution's groups each have their own inputs)."""
    static, padding = getattr(conv, "static_padding", None), conv.padding
    x = x if static is None else static(x)
    if isinstance(padding, str):  # "valid", or "same" (any odd spare on the right, as torch pads)
        totals = [d * (k - 1) if padding == "same" else 0
                  for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
        x = F.pad(x, [side for total in reversed(totals) for side in (total // 2, total - total // 2)])
        padding = 0
    patches = F.unfold(x, conv.kernel_size, conv.dilation, padding, conv.stride)  # (n, C k, L)
    batch, width, positions = patches.shape
    grouped = patches.reshape(batch, conv.groups, width // conv.groups, positions)
    return grouped.permute(1, 0, 3, 2).reshape(conv.groups, batch * positions, width // conv.groups)


def _geometry(conv: nn.Conv2d) -> tuple:
    return (repr((conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups,
                  getattr(conv, "static_padding", None))),)


register_qmodule(QModuleKind(
    "conv", QConv2d, replaces=_replaces,
    build=lambda module, spec, ranges: QConv2d.from_float(
        module, spec, ranges.get("input"), ranges.get("output"), ranges.get("input_shape"),
        ranges.get("weight")),
    empty=lambda module, spec: QConv2d(module, spec),
    input_rows=input_patches, rows_key=_geometry))
