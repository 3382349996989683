"""FakeQuant: a float module (Linear, Conv2d, Embedding) that trains on the numerics of the
quantized module it will become.

Its forward rounds the weight (and, for the dynamic and static schemes, the input and output) as
the quantized module's reference kernel does (lowbit.nn.kernels.reference), with gradients
passed straight through the rounding (lowbit.core.fake_quant). With `learn_scales` the weight
scales are parameters too (LSQ). `rounded()` gives the integers the quantized module stores, so
a trained FakeQuant converts to exactly the module it imitated.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from lowbit.core import Granularity, QuantizedTensor, get_qtype
from lowbit.core.fake_quant import (
    fake_quantize,
    fake_quantize_rows,
    fake_quantize_tensor,
    on_scale_grid_ste,
)
from lowbit.core.qtypes import UINT7, UINT8
from lowbit.core.quantize import compute_qparams, on_scale_grid, qparams_from_range, quantize_with
from lowbit.nn.qweight import round_to_nearest, storage_qtype
from lowbit.nn.spec import LayerSpec

Range = tuple[float, float]


class FakeQuant(nn.Module):
    """Wraps `module` (kept as `float_module`, its parameters trained as they are) and computes
    it with its weight, and its activations where `spec` rounds them, fake-quantized."""

    def __init__(self, module: nn.Module, spec: LayerSpec, learn_scales: bool = False,
                 input_range: Range | None = None, output_range: Range | None = None) -> None:
        super().__init__()
        self.float_module, self.spec = module, spec
        self.qtype = get_qtype(storage_qtype(spec))
        self.granularity = Granularity.parse(spec.granularity)
        self.ranges = {"input": input_range, "output": output_range}
        scale = zero_point = None
        if learn_scales and not self.qtype.is_float:
            scale, zero_point = self._weight_qparams()
            scale = nn.Parameter(scale)
        self.weight_scale = scale
        self.register_buffer("weight_zero_point", zero_point)

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
        return self._static("output", y) if self.spec.scheme == "static" else y

    def grid(self, side: str) -> tuple[float, int, int]:
        """The static scheme's calibrated grid of the "input" (7 or 8 bits) or "output" (8 bits):
        scale, zero point and top, as the quantized module will hold them."""
        low, high = self.ranges[side]
        qtype = UINT8 if side == "output" or self.spec.input_qmax == UINT8.qmax else UINT7
        scale, zero_point = qparams_from_range(torch.tensor(low), torch.tensor(high), qtype, symmetric=False)
        return float(scale), int(zero_point), qtype.qmax

    def _static(self, side: str, x: torch.Tensor) -> torch.Tensor:
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
        learned = "learned" if self.weight_scale is not None else "from each weight's range"
        return (f"scheme={self.spec.scheme}, weight={self.spec.weight}, "
                f"granularity={self.spec.granularity}, scales={learned}")
