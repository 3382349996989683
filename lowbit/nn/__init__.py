"""Quantized modules and the kernels they run on."""

from lowbit.nn.qconv import QConv2d
from lowbit.nn.qembedding import QEmbedding
from lowbit.nn.qlinear import QLinear
from lowbit.nn.spec import LayerSpec

QUANTIZED_MODULES = (QLinear, QConv2d, QEmbedding)

__all__ = ["LayerSpec", "QConv2d", "QEmbedding", "QLinear", "QUANTIZED_MODULES"]
