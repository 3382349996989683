"""Calibration files: a CalibrationResult's histograms as one safetensors file, written atomically
and read back only when its metadata says it is a lowbit calibration."""

from __future__ import annotations

import os
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lowbit.errors import FormatError
from lowbit.formats.atomic import atomic_file
from lowbit.transform.calibrate import FILES, CalibrationResult


def save_calibration(result: CalibrationResult, path: Path) -> Path:
    """Write `result` to `path` (replacing a file there) in one rename."""
    tensors, metadata = result.to_tensors()
    with atomic_file(path) as staging:
        save_file(tensors, staging, metadata=metadata)
    return path


def load_calibration(path: str | os.PathLike, model: nn.Module | None = None) -> CalibrationResult:
    """A CalibrationResult saved with `.save`; give `model` to `update` it with more data."""
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
    except (OSError, SafetensorError, ValueError) as error:
        raise FormatError(f"cannot read calibration file {path}: {error}") from None
    if metadata.get("format") != "lowbit-calibration":
        raise FormatError(f"{path} is not a lowbit calibration file")
    try:
        return CalibrationResult.from_tensors(tensors, metadata, model)
    except (ValueError, KeyError, TypeError) as error:
        raise FormatError(f"{path} is a damaged calibration file: {error}") from None


FILES.add("save", save_calibration)
