"""lowbit: quantize trained models to 16, 8 and 4 bits, and measure what it costs and buys."""

from lowbit.errors import (
    AccuracyBudgetError,
    CalibrationError,
    ChecksumError,
    FormatError,
    HardwareCompatibilityError,
    InvalidRecipeError,
    LowbitError,
    LowbitWarning,
    ModelLoadError,
    QuantizationError,
)
from lowbit.evaluate import estimate
from lowbit.evaluate.compare import bench, compare
from lowbit.evaluate.comparison import Comparison
from lowbit.families.loading import load
from lowbit.families.sources import load_source
from lowbit.formats.persist import save
from lowbit.transform.calibrate import CalibrationResult, calibrate, load_calibration
from lowbit.transform.quantize import quantize
from lowbit.transform.recipe import PRESETS, Recipe, make_recipe
from lowbit.tune.search import TuneResult, tune
from lowbit.version import __version__

__all__ = [
    "__version__",
    "PRESETS",
    "AccuracyBudgetError",
    "CalibrationError",
    "CalibrationResult",
    "Comparison",
    "ChecksumError",
    "FormatError",
    "HardwareCompatibilityError",
    "InvalidRecipeError",
    "LowbitError",
    "LowbitWarning",
    "ModelLoadError",
    "QuantizationError",
    "Recipe",
    "TuneResult",
    "bench",
    "calibrate",
    "compare",
    "estimate",
    "load",
    "load_calibration",
    "load_source",
    "make_recipe",
    "quantize",
    "save",
    "tune",
]
