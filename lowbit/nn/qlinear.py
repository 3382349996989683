"""QLinear: a Linear layer whose weight is stored quantized and computed with an integer kernel."""

from __future__ import annotations

import torch
from torch import nn

from lowbit.core import QuantizedTensor
from lowbit.core.quantize import check_finite
from lowbit.nn.kernels import ROW_BUCKETS, candidate_kernels, choose_kernels, run_kernel
from lowbit.nn.qweight import QuantizedWeightMixin
from lowbit.nn.registry import QModuleKind, register_qmodule
from lowbit.nn.spec import LayerSpec


class QLinear(QuantizedWeightMixin, nn.Module):
    """Drop-in replacement for `nn.Linear` with weight-only, dynamic or static quantization."""

    kind = "linear"

    def __init__(self, in_features: int, out_features: int, bias: bool, spec: LayerSpec) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.kernel_cache: dict = {}
        self._init_weight_buffers(spec, (out_features, in_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        if spec.scheme == "static":
            self._init_static_activation_buffers()

    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        spec: LayerSpec,
        input_range: tuple[float, float] | None = None,
        output_range: tuple[float, float] | None = None,
        choose_kernel: bool = True,
        rounded: QuantizedTensor | None = None,
    ) -> QLinear:
        """Quantize a float Linear (its weight as `rounded` by an algorithm, else round-to-nearest);
        static needs calibrated input/output ranges."""
        check_finite(linear.weight, "weight")
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, spec)
        module._store_weight(linear.weight.detach().float(), rounded)
        if linear.bias is not None:
            module.bias.copy_(linear.bias.detach().float())
        if spec.scheme == "static":
            module.set_activation_ranges(input_range, output_range)
        if choose_kernel:
            module.spec = spec.with_kernels(choose_kernels(module))
        return module

    def first_outputs(self, count: int) -> QLinear:
        """A QLinear computing only the first `count` outputs, its buffers views of this one's:
        what a very wide layer's kernels are timed on (lowbit.nn.kernels.choose_kernels)."""
        view = QLinear(self.in_features, count, self.bias is not None, self.spec)
        for name, buffer in self.named_buffers(recurse=False):
            rows = buffer is not None and buffer.dim() and buffer.shape[0] == self.out_features
            setattr(view, name, buffer[:count] if rows else buffer)
        return view

    def kernel_problem(self) -> str | None:
        buckets = {str(rows) for rows in ROW_BUCKETS}
        fits = set(candidate_kernels(self, this_machine=False))
        wrong = [f"{rows}: {name}" for rows, name in self.spec.kernels.items()
                 if rows not in buckets or name not in fits]
        if wrong:
            return f"kernels that do not fit a {self.spec.weight} {self.spec.scheme} Linear: {wrong}"
        return None

    def use_available_kernels(self) -> list[str]:
        """Swap kernels this machine cannot run for the reference: fbgemm where this PyTorch build
        lacks it, or where 8-bit activations would saturate (no VNNI); returns those swapped."""
        runnable = set(candidate_kernels(self))
        missing = sorted({name for name in self.spec.kernels.values() if name not in runnable})
        if missing:
            self.spec = self.spec.with_kernels({rows: name if name in runnable else "reference"
                                                for rows, name in self.spec.kernels.items()})
        return missing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.dtype != torch.float32:
            rows = rows.float()
        y = run_kernel(self, rows).reshape(*x.shape[:-1], self.out_features)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def extra_repr(self) -> str:
        kernels = ", ".join(f"{k}={v}" for k, v in self.spec.kernels.items())
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"scheme={self.spec.scheme}, weight={self.spec.weight}, "
            f"granularity={self.spec.granularity}, kernels=[{kernels}]"
        )


register_qmodule(QModuleKind(
    "linear", QLinear, replaces=lambda module: type(module) is nn.Linear,
    build=lambda module, spec, ranges: QLinear.from_float(
        module, spec, ranges.get("input"), ranges.get("output"), rounded=ranges.get("weight")),
    empty=lambda module, spec: QLinear(
        module.in_features, module.out_features, module.bias is not None, spec),
    input_rows=lambda module, x: x.reshape(1, -1, x.shape[-1])))
