"""FakeQuant: a float module (Linear, Conv2d, Embedding) that trains on the numerics of the
quantized module it will become.

Its forward rounds the weight (and, for the dynamic and static schemes, the input and output) as
the quantized module's reference kernel does (lowbit.nn.kernels.reference), with gradients
passed straight through the rounding (lowbit.core.fake_quant). With `learn_scales` the weight
scales are parameters too (LSQ); the static scheme's activation ranges named in `learn_ranges`
("input", "output") are too, each end moving in steps of RANGE_RATE x its calibrated span per
unit of its parameter (Adam's steps are about the learning rate whatever the gradient, and the
weights' learning rate would barely move a range). `rounded()` and `ranges` give the integers
and ranges the quantized module stores, so a trained FakeQuant converts to exactly the module it
imitated.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from lowbit.core import Granularity, QuantizedTensor, get_qtype
from lowbit.core.fake_quant import (
    fake_quantize,
    fake_quantize_range,
    fake_quantize_rows,
    fake_quantize_tensor,
    on_scale_grid_ste,
)
from lowbit.core.qtypes import UINT7, UINT8
from lowbit.core.quantize import compute_qparams, on_scale_grid, qparams_from_range, quantize_with
from lowbit.nn.qweight import round_to_nearest, storage_qtype
from lowbit.nn.spec import LayerSpec

Range = tuple[float, float]
RANGE_RATE = 20.0  # a learned range end moves by this x its calibrated span per unit of its parameter


class FakeQuant(nn.Module):
    """Wraps `module` (kept as `float_module`, its parameters trained as they are) and computes
    it with its weight, and its activations where `spec` rounds them, fake-quantized."""

    def __init__(self, module: nn.Module, spec: LayerSpec, learn_scales: bool = False,
                 input_range: Range | None = None, output_range: Range | None = None,
                 learn_ranges: tuple[str, ...] = (), rounded: QuantizedTensor | None = None) -> None:
        super().__init__()
        self.float_module, self.spec = module, spec
        self.qtype = get_qtype(storage_qtype(spec))
        self.granularity = Granularity.parse(spec.granularity)
        self.calibrated = {"input": input_range, "output": output_range}
        rounded_sides = ("input", "output") if spec.output == "uint8" else ("input",)
        learned = [side for side in learn_ranges if spec.scheme == "static"
                   and side in rounded_sides and self.calibrated[side] is not None]
        self.range_steps = nn.ParameterDict({side: nn.Parameter(torch.zeros(2)) for side in learned})
        scale = zero_point = None
        if rounded is not None and not self.qtype.is_float:
            scale, zero_point = self._start_from(rounded)
        elif learn_scales and not self.qtype.is_float:
            scale, zero_point = self._weight_qparams()
        if learn_scales and scale is not None:
            self.weight_scale = nn.Parameter(scale)
        else:
            self.register_buffer("weight_scale", scale)
        self.register_buffer("weight_zero_point", zero_point)

    def _start_from(self, rounded: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Set the float weight to an algorithm's rounding (GPTQ) and return its grid, which then
        stays fixed (learned with `learn_scales`): the weight trains from those integers, not
        from its own round-to-nearest."""
        like, like_zero = self._weight_qparams()
        with torch.no_grad():
            self.float_module.weight.copy_(rounded.dequantize().reshape(self.float_module.weight.shape))
        zero_point = None if rounded.zero_point is None else rounded.zero_point.reshape(like_zero.shape)
        return rounded.scale.detach().float().reshape(like.shape).clone(), zero_point

    def _weight_qparams(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scales (and zero points) from the weight's own range, as round-to-nearest takes them."""
        return compute_qparams(self.float_module.weight.detach(), self.qtype, self.granularity,
                               self.spec.symmetric, self.spec.torch_scale_dtype)

    def fake_weight(self) -> torch.Tensor:
        weight = self.float_module.weight
        if self.qtype.is_float:  # fp16 / bf16: the cast, straight through
            return weight + (weight.detach().to(self.qtype.storage_dtype).float() - weight).detach()
        if self.weight_scale is None:
            scale, zero_point = self._weight_qparams()
        else:
            scale = on_scale_grid_ste(self.weight_scale, self.spec.torch_scale_dtype)
            zero_point = self.weight_zero_point
        return fake_quantize(weight, scale, zero_point, self.qtype, self.granularity, self.spec.symmetric)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.scheme == "dynamic":
            x = fake_quantize_rows(x.reshape(-1, x.shape[-1]), self.spec.input_qmax).reshape(x.shape)
        elif self.spec.scheme == "static":
            x = self._static("input", x)
        y = functional_call(self.float_module, {"weight": self.fake_weight()}, (x,))
        rounds_output = self.spec.scheme == "static" and self.spec.output == "uint8"
        return self._static("output", y) if rounds_output else y

    def bounds(self, side: str) -> torch.Tensor:
        """(low, high) of a learned static range, differentiable in its parameter."""
        low, high = self.calibrated[side]
        start = torch.tensor([low, high], dtype=torch.float32)
        return start + RANGE_RATE * (high - low) * self.range_steps[side]

    @property
    def ranges(self) -> dict[str, Range | None]:
        """The static scheme's "input" and "output" ranges as they stand (calibrated, or learned
        since), as the quantized module is built with them."""
        learned = {side: tuple(float(end) for end in self.bounds(side).detach()) for side in self.range_steps}
        return {**self.calibrated, **learned}

    def grid(self, side: str) -> tuple[float, int, int]:
        """The static scheme's grid of the "input" (7 or 8 bits) or "output" (8 bits): scale, zero
        point and top, as the quantized module will hold them."""
        low, high = self.ranges[side]
        scale, zero_point = qparams_from_range(torch.tensor(low), torch.tensor(high), self._grid_type(side),
                                               symmetric=False)
        return float(scale), int(zero_point), self._grid_type(side).qmax

    def _grid_type(self, side: str):
        return UINT8 if side == "output" or self.spec.input_qmax == UINT8.qmax else UINT7

    def _static(self, side: str, x: torch.Tensor) -> torch.Tensor:
        if side in self.range_steps:
            return fake_quantize_range(x, self.bounds(side), self._grid_type(side).qmax)
        return fake_quantize_tensor(x, *self.grid(side))

    def rounded(self) -> QuantizedTensor:
        """The weight's integers, scales and zero points as the quantized module stores them."""
        weight = self.float_module.weight.detach().float()
        if self.weight_scale is None:
            return round_to_nearest(weight, self.spec)
        scale = on_scale_grid(self.weight_scale.detach(), self.spec.torch_scale_dtype)
        data = quantize_with(weight, scale, self.weight_zero_point, self.qtype, self.granularity,
                             self.spec.symmetric)
        return QuantizedTensor(data, scale, self.weight_zero_point, self.qtype, self.granularity)

    def extra_repr(self) -> str:
        learned = ("learned" if isinstance(self.weight_scale, nn.Parameter) else "fixed"
                   if self.weight_scale is not None else "from each weight's range")
        ranges = f", learned ranges={'+'.join(self.range_steps)}" if len(self.range_steps) else ""
        return (f"scheme={self.spec.scheme}, weight={self.spec.weight}, "
                f"granularity={self.spec.granularity}, scales={learned}{ranges}")
