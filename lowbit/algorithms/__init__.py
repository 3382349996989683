"""Algorithms: how a float weight becomes integers, scales and zero points, one file each, behind
one registry keyed by `Recipe.algorithm` (GPTQ, HQQ or AWQ add a file that registers itself).

An algorithm is a function `(weight, spec) -> QuantizedTensor`; the model walk
(lowbit.transform.quantize) hands the result to the quantized module, which stores it.
"""

from collections.abc import Callable

import torch

from lowbit.core import QuantizedTensor
from lowbit.nn.spec import LayerSpec
from lowbit.registry import Registry

Algorithm = Callable[[torch.Tensor, LayerSpec], QuantizedTensor]
ALGORITHMS: Registry[Algorithm] = Registry("weight-rounding algorithm")

from lowbit.algorithms import rtn  # noqa: E402,F401 - registers itself
