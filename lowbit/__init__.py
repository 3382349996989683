"""lowbit: quantize trained models to 16, 8 and 4 bits, and measure what it costs and buys."""

import logging

import lowbit.qat  # noqa: F401 - quantization-aware training, as lowbit.qat
import lowbit.report  # noqa: F401 - registers the Markdown and HTML renderers
import lowbit.sklearn  # noqa: F401 - the public scikit-learn face, as lowbit.sklearn
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
    PruningError,
    QuantizationError,
)
from lowbit.evaluate import estimate
from lowbit.evaluate.comparison import Comparison
from lowbit.families.api import batch, bench, compare, load, save, tune
from lowbit.families.lazy_weights import quantize_pretrained
from lowbit.families.sources import load_source
from lowbit.formats.calibration import load_calibration
from lowbit.formats.gguf_file import export_gguf
from lowbit.transform.calibrate import CalibrationResult, calibrate
from lowbit.transform.distill import distill
from lowbit.transform.prune import prune
from lowbit.transform.quantize import quantize
from lowbit.transform.recipe import PRESETS, Recipe, make_recipe
from lowbit.tune.search import TuneResult
from lowbit.version import __version__

# A library's logger reaches the handlers its application configures; without any, nothing is
# printed twice (what lowbit says to a person comes as a LowbitWarning or a progress line).
logging.getLogger("lowbit").addHandler(logging.NullHandler())

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
    "PruningError",
    "QuantizationError",
    "Recipe",
    "TuneResult",
    "batch",
    "bench",
    "calibrate",
    "compare",
    "distill",
    "estimate",
    "export_gguf",
    "load",
    "load_calibration",
    "load_source",
    "make_recipe",
    "prune",
    "quantize",
    "quantize_pretrained",
    "save",
    "tune",
]
