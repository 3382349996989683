"""lowbit's own exception types: every user-facing failure is one of these, never a deep torch error."""

from __future__ import annotations


class LowbitError(Exception):
    """Base class of every error lowbit raises on purpose; the CLI turns it into exit code 2."""


class InvalidRecipeError(LowbitError, ValueError):
    """A recipe, preset name or quantization option is unknown or inconsistent."""


class QuantizationError(LowbitError):
    """A model or tensor cannot be quantized as asked (bad weights, bad shape, unsupported module)."""


class HardwareCompatibilityError(QuantizationError):
    """This machine lacks the kernel a scheme needs; `quantize` falls back (with a warning) to the
    reference kernel, or to the `fallback` recipe when one is given, instead of raising it."""


class AccuracyBudgetError(LowbitError):
    """No quantized candidate met the accuracy budget; `.result` holds the measured trials."""

    def __init__(self, message: str, result: object = None) -> None:
        super().__init__(message)
        self.result = result


class NotSmallerError(LowbitError):
    """The quantized file would be no smaller than the original, so it was not written (the CLI
    exits 4, as when tune finds nothing within budget)."""


class LowbitWarning(UserWarning):
    """Something lowbit worked around (a fallback, an unverified result) that you should know."""


class MissingKernelWarning(LowbitWarning):
    """A saved model names a kernel this machine lacks; it runs the slow reference kernel instead
    (and `lowbit.load(..., fallback=ORIGINAL)` serves the original)."""


class CalibrationError(LowbitError):
    """Calibration data is missing, empty, or does not fit the model."""


class FormatError(LowbitError):
    """A saved model folder or file is missing, corrupt, or of an unknown format version."""


class ChecksumError(FormatError):
    """A tensor or file does not match the sha256 recorded when it was saved."""


class ModelLoadError(LowbitError):
    """A source model (folder, factory, weights file) cannot be found or built."""


class PruningError(LowbitError):
    """A pruning request cannot be met: a sparsity outside [0, 1), an unknown pattern, or a 2:4
    pattern on rows whose length is not a multiple of 4."""
