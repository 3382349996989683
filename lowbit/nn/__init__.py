"""Quantized modules and the kernels they run on."""

from lowbit.nn.qconv import QConv2d
from lowbit.nn.qembedding import QEmbedding
from lowbit.nn.qlinear import QLinear
from lowbit.nn.registry import quantized_classes
from lowbit.nn.spec import LayerSpec

QUANTIZED_MODULES = quantized_classes()  # every registered quantized module class

__all__ = ["LayerSpec", "QConv2d", "QEmbedding", "QLinear", "QUANTIZED_MODULES"]
