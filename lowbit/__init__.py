"""lowbit: quantize trained models to 16, 8 and 4 bits, and measure what it costs and buys."""

from lowbit.errors import (
    CalibrationError,
    ChecksumError,
    FormatError,
    InvalidRecipeError,
    LowbitError,
    ModelLoadError,
    QuantizationError,
)
from lowbit.quantize import quantize
from lowbit.recipe import PRESETS, Recipe, make_recipe

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "CalibrationError",
    "ChecksumError",
    "FormatError",
    "InvalidRecipeError",
    "LowbitError",
    "ModelLoadError",
    "QuantizationError",
    "Recipe",
    "make_recipe",
    "quantize",
]
