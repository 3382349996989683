"""LayerSpec: how one module is quantized — the unit recorded per module in lowbit.json."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

SCHEMES = ("weight_only", "dynamic", "static")
WEIGHT_TYPES = ("int8", "int5", "int4", "fp16", "bf16")
# Activation grids of the dynamic and static schemes: "uint8" rounds a module's input on a 7-bit
# grid (fbgemm's int16 pair sums cannot saturate on it without VNNI) and a static one's output on
# an 8-bit one; "uint8-full" rounds inputs on 8 bits: a static convolution's (it runs the exact
# reference kernel in PyTorch; ONNX Runtime runs it with unsigned weights, which cannot saturate
# either) and, on a CPU with VNNI, a dynamic Linear's (fbgemm there sums in int32 directly).
ACTIVATIONS = ("uint8", "uint8-full")
# What a weight grid's scales are held in: float16 scales are what GGUF's blocks store, so a
# model quantized with them exports to GGUF exactly (lowbit.formats.gguf_file)
SCALE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
# What an asymmetric grid's zero points are: integers on the grid (round-to-nearest, GPTQ, AWQ),
# or any float (HQQ optimises them; x = (q - z) · scale all the same); or, instead of a zero point,
# a float minimum added to the levels, x = q · scale + minimum (llama.cpp's Q4_1 blocks)
ZERO_POINTS = ("int", "float", "minimum")
# What a static module's output leaves as: rounded onto a calibrated 8-bit grid (what the next
# int8 module reads), or float (the int32 sums times the scales) when the model returns it:
# nothing reads it as int8, and rounding a classifier's logits clips the largest and ties the
# nearest (lowbit.transform.calibrate.collect_histograms finds such modules). Linear only: fbgemm
# and ONNX Runtime have int8 matrix products with a float output, no such convolution
OUTPUTS = ("uint8", "float")


@dataclass(frozen=True)
class LayerSpec:
    """Scheme, weight type and granularity of one module, and the kernels chosen for it.

    `kernels` maps a row bucket (the most rows it serves, as text; "all" when one kernel serves every
    input) to a kernel name, chosen by measurement when the module is built and saved with it, so
    a reload runs the same code and gives the same outputs. `scale_dtype` names the values the
    weight scales may take ("float32" or "float16"; they are stored in float32 either way);
    `zero_point` whether an asymmetric int4 grid's zero points are integers or floats (HQQ), or
    whether it has a float minimum instead ("minimum": x = q · scale + minimum, held in the scale type);
    `output` whether a static module rounds its output onto an 8-bit grid or leaves it float.
    """

    scheme: str
    weight: str
    granularity: str
    symmetric: bool
    activation: str | None = None
    kernels: dict[str, str] = field(default_factory=dict)
    scale_dtype: str = "float32"
    zero_point: str = "int"
    output: str = "uint8"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerSpec:
        return cls(**data)

    def kernel_for(self, rows: int) -> str:
        """The kernel this spec runs for an input of `rows` rows: the one recorded for "all", or
        for the smallest bucket that holds `rows` (the largest bucket serves every larger input);
        the reference when nothing is recorded."""
        if "all" in self.kernels:
            return self.kernels["all"]
        buckets = sorted(int(bucket) for bucket in self.kernels)
        if not buckets:
            return "reference"
        return self.kernels[str(next((bucket for bucket in buckets if rows <= bucket), buckets[-1]))]

    def with_kernels(self, kernels: dict[str, str]) -> LayerSpec:
        return replace(self, kernels=dict(kernels))

    def problem(self, kind: str, weight_shape: tuple[int, ...]) -> str | None:
        """Why a module of `kind` ("linear", "conv", "embedding") with this weight shape cannot
        run this spec, or None: only the combinations a Recipe produces have kernels."""
        granularity = self.granularity
        if self.scheme not in SCHEMES or self.weight not in WEIGHT_TYPES:
            return f"unknown scheme {self.scheme!r} or weight type {self.weight!r}"
        if self.scale_dtype not in SCALE_DTYPES:
            return f"unknown scale type {self.scale_dtype!r}; choose one of {', '.join(SCALE_DTYPES)}"
        if self.zero_point not in ZERO_POINTS or (self.zero_point != "int" and (
                self.weight != "int4" or self.symmetric or not granularity.startswith("group:"))):
            return "float zero points and minimums are for asymmetric int4 groups only"
        float_output_allowed = (self.scheme, kind) == ("static", "linear")
        if self.output not in OUTPUTS or (self.output != "uint8" and not float_output_allowed):
            return f"unknown output {self.output!r}; only a static Linear's output may be float"
        if self.weight in ("fp16", "bf16"):
            return None if (self.scheme, granularity) == ("weight_only", "per_tensor") else \
                "16-bit float weights are stored weight-only and per tensor"
        if self.weight in ("int4", "int5"):
            group = int(granularity.split(":")[1]) if granularity.startswith("group:") else 0
            if self.scheme != "weight_only" or kind == "conv" or not group or weight_shape[-1] % group:
                return f"{self.weight} weights need weight-only groups that divide the input dimension"
            return None
        if granularity.startswith("group:"):
            if self.scheme != "weight_only" or kind == "conv" or weight_shape[-1] % int(granularity[6:]):
                return "grouped int8 weights need weight-only groups that divide the input dimension"
            return None
        if granularity not in ("per_channel", "per_tensor"):
            return "int8 weights are per channel (along the output dimension), per tensor or per group"
        if self.scheme != "weight_only" and (not self.symmetric or kind == "embedding"):
            return f"the {self.scheme} scheme needs symmetric int8 weights on a Linear or Conv2d"
        if kind == "conv" and self.scheme == "dynamic":
            return "convolutions are quantized weight-only or static, not dynamic"
        if self.activation == "uint8-full" and (kind, self.scheme) not in (("conv", "static"),
                                                                           ("linear", "dynamic")):
            return "only a static convolution or a dynamic Linear rounds its input on a full 8-bit grid"
        return None

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return SCALE_DTYPES[self.scale_dtype]

    @property
    def input_qmax(self) -> int:
        """The top of a module's input grid: 7 bits, or 8 ("uint8-full")."""
        return 255 if self.activation == "uint8-full" else 127
