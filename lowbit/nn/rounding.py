"""Rounding points: a module's output rounded onto an 8-bit grid, by a forward hook.

The static scheme rounds tensors inside quantized modules. Where a quantized convolution reads a
tensor another module made (an EfficientNet block's residual sum), lowbit rounds that module's
output instead (lowbit.transform.fold finds where): every reader then sees the one rounded tensor
(the skip path too), as an int8 runtime computes it, and ONNX Runtime can add such tensors in
int8 (`QLinearAdd`). The hook quantizes and dequantizes with torch's `quantized_decomposed` ops
(those of its PT2E flow; the same numbers as `torch.fake_quantize_per_tensor_affine`), which
torch's ONNX exporter writes as QuantizeLinear/DequantizeLinear with the batch dimension free.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from lowbit.core.fake_quant import fake_quantize_tensor

GRID_MAX = 255


class OutputRounding:
    """A forward hook rounding a module's (tensor) output onto `scale`, `zero_point`, 0..255."""

    def __init__(self, scale: float, zero_point: int) -> None:
        self.scale, self.zero_point = scale, zero_point

    def __call__(self, module: nn.Module, args: tuple, output: object) -> object:
        if not isinstance(output, torch.Tensor) or not output.is_floating_point():
            return output
        ops = torch.ops.quantized_decomposed
        grid = (self.scale, self.zero_point, 0, GRID_MAX, torch.uint8)
        rounded = ops.dequantize_per_tensor(ops.quantize_per_tensor(output.float(), *grid), *grid)
        return rounded.to(output.dtype)


class FakeOutputRounding(OutputRounding):
    """The same rounding for quantization-aware training (lowbit.transform.qat): equal values,
    with the gradient passed straight through inside the grid."""

    def __call__(self, module: nn.Module, args: tuple, output: object) -> object:
        if not isinstance(output, torch.Tensor) or not output.is_floating_point():
            return output
        return fake_quantize_tensor(output, self.scale, self.zero_point, GRID_MAX)


def attach_fake_roundings(model: nn.Module, roundings: dict[str, tuple[float, int]]) -> None:
    """Round the named modules' outputs as `attach_roundings` will, differentiably, for training."""
    modules = dict(model.named_modules())
    for name, (scale, zero_point) in roundings.items():
        modules[name].register_forward_hook(FakeOutputRounding(scale, zero_point))


def detach_fake_roundings(model: nn.Module) -> None:
    """Remove what `attach_fake_roundings` attached (a converted model takes the real ones)."""
    for module in model.modules():
        for key, hook in list(module._forward_hooks.items()):
            if isinstance(hook, FakeOutputRounding):
                del module._forward_hooks[key]


def attach_roundings(model: nn.Module, roundings: dict[str, tuple[float, int]]) -> nn.Module:
    """Round the named modules' outputs (in place); kept in `model.lowbit_roundings` for saving."""
    if roundings:  # registers the ops; before any export too, or its op registry lacks them
        importlib.import_module("torch.ao.quantization.fx._decomposed")
    modules = dict(model.named_modules())
    for name, (scale, zero_point) in roundings.items():
        modules[name].register_forward_hook(OutputRounding(scale, zero_point))
    model.lowbit_roundings = {**getattr(model, "lowbit_roundings", {}), **roundings}
    return model
