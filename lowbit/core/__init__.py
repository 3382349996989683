"""Numerics: quantized types, scale/zero-point math, bit packing, histograms and calibrators."""

from lowbit.core.calibrators import CALIBRATORS, compute_range
from lowbit.core.granularity import Granularity
from lowbit.core.histogram import Histogram
from lowbit.core.packing import pack_int4, unpack_int4
from lowbit.core.qtypes import QTYPES, QType, get_qtype
from lowbit.core.quantize import QuantizedTensor, compute_qparams, quantize_tensor

__all__ = [
    "CALIBRATORS",
    "Granularity",
    "Histogram",
    "QTYPES",
    "QType",
    "QuantizedTensor",
    "compute_qparams",
    "compute_range",
    "get_qtype",
    "pack_int4",
    "quantize_tensor",
    "unpack_int4",
]
