"""Algorithms: how a float weight becomes integers, scales and zero points, one file each, behind
one registry keyed by `Recipe.algorithm` (a new algorithm adds a file that registers itself).

An algorithm rounds `(weight, spec)` to a QuantizedTensor on the spec's grid; one that
`needs_hessian` (GPTQ, AWQ) also takes the Hessian of the layer's calibration inputs, which the model
walk gathers block by block (lowbit.transform.sequential). The walk (lowbit.transform.quantize)
hands the result to the quantized module, which stores it.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lowbit.core import QuantizedTensor
from lowbit.registry import Registry


@dataclass(frozen=True)
class Algorithm:
    """`round(weight, spec)`, or `round(weight, spec, hessian)` when `needs_hessian`. One that
    `scales_inputs` (AWQ) first gives, for the Linears reading one tensor, factors by which their
    weight columns are multiplied and the tensor divided (`scales_inputs(weights, hessian, spec)`;
    lowbit.transform.awq folds them into the model). One with `float_zero_points` gets specs whose
    asymmetric int4 grids take any float zero point (LayerSpec.zero_point)."""

    round: Callable[..., QuantizedTensor]
    needs_hessian: bool = False
    scales_inputs: Callable[..., torch.Tensor] | None = None
    float_zero_points: bool = False  # its asymmetric int4 grids have float zero points (HQQ)


ALGORITHMS: Registry[Algorithm] = Registry("weight-rounding algorithm")

from lowbit.algorithms import awq, gptq, hqq, rtn  # noqa: E402,F401 - they register themselves
