"""Scale tuning: with every integer of a weight-only quantized model fixed, train its group scales
and its float norms to reproduce the float model's outputs, then store the scales back on their
grid (float16 for the GGUF recipes).

Chen et al., "EfficientQAT: Efficient Quantization-Aware Training for Large Language Models"
(2024), section 3.3, "end-to-end training of quantization parameters" (E2E-QP): after
block-wise rounding, only the step sizes train, end to end, so the model keeps its integers, its
file size and its block structure. Here the integers come from any of lowbit's algorithms (RTN,
GPTQ, AWQ + GPTQ), and the loss is distillation from the float model (lowbit.transform.distill)
instead of next-token labels. Each group's scale s trains as s · exp(t), t from 0, which keeps
its sign (lowbit's symmetric grids stored unsigned may have negative scales).

On SmolLM2-135M at `q4_0-awq-gptq` it takes the perplexity from +10.4% over fp32 to +8.2% in 64
steps of one 512-token calibration sequence (bench.llm_4bit, bench/README.md).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.core.quantize import from_blocks, on_scale_grid, to_blocks
from lowbit.errors import QuantizationError
from lowbit.nn.kinds import set_module
from lowbit.transform.distill import DistillResult, distill
from lowbit.transform.quantize import quantized_modules

STAND_INS = ("linear", "embedding")  # the quantized module kinds ScaledCodes stands in for


class ScaledCodes(nn.Module):
    """A float stand-in for a weight-only quantized Linear or Embedding: its integers (less their
    zero points) fixed, its scales times exp(t), t trainable when `trainable`."""

    def __init__(self, module: nn.Module, trainable: bool) -> None:
        super().__init__()
        weight = module.quantized_weight()
        blocks = to_blocks(weight.data, weight.granularity).float()
        if weight.zero_point is not None:
            blocks = blocks - weight.zero_point.reshape(-1, 1).float()
        self.register_buffer("centered", blocks)
        # a copy: the module's own scales are written back while other stand-ins may still read theirs
        self.register_buffer("scale", weight.scale.detach().float().reshape(-1, 1).clone())
        self.log_factor = nn.Parameter(torch.zeros_like(self.scale), requires_grad=trainable)
        self.granularity, self.shape = weight.granularity, weight.data.shape
        self.embedding = module.kind == "embedding"
        self.padding_idx = getattr(module, "padding_idx", None)
        self.bias = None if getattr(module, "bias", None) is None else module.bias.detach().float()

    def tuned_scale(self) -> torch.Tensor:
        return self.scale * self.log_factor.exp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = from_blocks(self.centered * self.tuned_scale(), self.shape, self.granularity)
        if self.embedding:
            return F.embedding(x, weight, self.padding_idx)
        return F.linear(x, weight, self.bias)


def _tunable(module: nn.Module) -> bool:
    """Group-wise weight-only Linears train their scales; everything else quantized stays fixed."""
    spec = module.spec
    return (spec.scheme == "weight_only" and module.kind == "linear" and spec.granularity.startswith("group:")
            and getattr(module, "weight_scale", None) is not None)


def _student(quantized: nn.Module) -> tuple[nn.Module, dict[str, ScaledCodes], dict[str, nn.Parameter]]:
    """A float copy of `quantized` with ScaledCodes for its quantized modules, the stand-ins whose
    scales train, and the norm parameters that train with them."""
    modules = quantized_modules(quantized)
    refused = {name: m.spec.scheme for name, m in modules.items() if m.spec.scheme != "weight_only"}
    if refused:
        name, scheme = next(iter(refused.items()))
        raise QuantizationError(f"scale tuning is for weight-only models; {name} is {scheme}")
    offset = next((name for name, m in modules.items() if m.spec.zero_point == "minimum"), None)
    if offset is not None:
        raise QuantizationError(f"scale tuning trains scales of grids through zero; {offset}'s grid has a "
                                "minimum (a Q4_1 recipe), which would have to train with them")
    other = [name for name, m in modules.items() if m.kind not in STAND_INS]
    if other:
        raise QuantizationError(f"scale tuning trains Linear and Embedding modules; {other[0]} is a "
                                f"{modules[other[0]].kind}")
    if not any(_tunable(m) for m in modules.values()):
        raise QuantizationError("the model has no group-wise weight-only Linear whose scales could train")
    student = _float_copy(quantized, modules)
    for parameter in student.parameters():
        parameter.requires_grad_(False)
    tuned, factors = {}, {}
    for name, module in modules.items():
        sharing = _sharing_scales(modules, module)
        stand_in = ScaledCodes(module, trainable=any(_tunable(m) for m in sharing))
        if len(sharing) > 1:  # a tied LM head and embedding: one set of scales, trained as one
            stand_in.log_factor = factors.setdefault(id(module.weight_scale), stand_in.log_factor)
        set_module(student, name, stand_in)
        if stand_in.log_factor.requires_grad:
            tuned[name] = stand_in
    norms = {f"{name}.{key}": parameter for name, module in student.named_modules()
             if type(module).__name__.endswith("Norm")
             for key, parameter in module.named_parameters(recurse=False)}
    for parameter in norms.values():
        parameter.requires_grad_(True)
    return student, tuned, norms


def _sharing_scales(modules: dict[str, nn.Module], module: nn.Module) -> list[nn.Module]:
    """The quantized modules holding `module`'s very scale tensor (itself included)."""
    scale = getattr(module, "weight_scale", None)
    if scale is None:
        return [module]
    return [m for m in modules.values() if getattr(m, "weight_scale", None) is scale]


def _float_copy(quantized: nn.Module, modules: dict[str, nn.Module]) -> nn.Module:
    """A deep copy of `quantized` without copying its quantized modules (they are replaced)."""
    memo = {id(module): nn.Identity() for module in modules.values()}
    return copy.deepcopy(quantized, memo)


def write_back(quantized: nn.Module, tuned: dict[str, ScaledCodes], norms: dict[str, nn.Parameter]) -> None:
    """Store the trained scales (on their grid: float16 for the GGUF recipes) and norms into the
    quantized model; modules that share scales (a tied LM head and embedding) trained them as one."""
    with torch.no_grad():
        for name, stand_in in tuned.items():
            module = quantized.get_submodule(name)
            scale = on_scale_grid(stand_in.tuned_scale(), module.spec.torch_scale_dtype)
            module.weight_scale.copy_(scale.reshape(module.weight_scale.shape))
            getattr(module, "kernel_cache", {}).clear()
        for name, parameter in norms.items():
            quantized.get_parameter(name).copy_(parameter)


def tune_scales(
    quantized: nn.Module,
    teacher: nn.Module,
    data: Sequence[Any],
    steps: int | None = None,
    time_budget: float | None = None,
    tokenizer: Any = None,
    lr: float = 1e-3,
    batch_size: int = 1,
    max_length: int = 512,
    seed: int = 0,
    progress: bool = True,
) -> DistillResult:
    """Train `quantized`'s group scales and norms (in place) to reproduce `teacher`'s outputs on
    `data` (batches, or texts with `tokenizer`), for `steps` or `time_budget` seconds; every
    integer stays as it is. Weight-only models only (the `w4-*` and `q*_0` recipes)."""
    student, tuned, norms = _student(quantized)
    result = distill(student, teacher, data, steps=steps, time_budget=time_budget, tokenizer=tokenizer,
                     lr=lr, batch_size=batch_size, max_length=max_length, seed=seed, progress=progress)
    write_back(quantized, tuned, norms)
    quantized.lowbit_training = {**result.to_dict(), "method": "scale tuning (distillation)",
                                 "trained": f"{len(tuned)} modules' group scales, {len(norms)} norm weights"}
    return result
