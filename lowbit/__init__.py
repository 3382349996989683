"""lowbit: quantize trained models to 16, 8 and 4 bits, and measure what it costs and buys."""

from lowbit.compare import bench, compare
from lowbit.errors import (
    CalibrationError,
    ChecksumError,
    FormatError,
    InvalidRecipeError,
    LowbitError,
    ModelLoadError,
    QuantizationError,
)
from lowbit.evaluate import estimate
from lowbit.evaluate.comparison import Comparison
from lowbit.persist import load, save
from lowbit.quantize import quantize
from lowbit.recipe import PRESETS, Recipe, make_recipe
from lowbit.sources import load_source
from lowbit.version import __version__

__all__ = [
    "__version__",
    "PRESETS",
    "CalibrationError",
    "Comparison",
    "ChecksumError",
    "FormatError",
    "InvalidRecipeError",
    "LowbitError",
    "ModelLoadError",
    "QuantizationError",
    "Recipe",
    "bench",
    "compare",
    "estimate",
    "load",
    "load_source",
    "make_recipe",
    "quantize",
    "save",
]
