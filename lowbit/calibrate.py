"""Calibration: run data through a model and fill one activation histogram per watched module."""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager
from typing import Any

import torch
from rich.progress import Progress
from torch import nn

from lowbit.core import Histogram, compute_range
from lowbit.errors import CalibrationError, LowbitError


def run_batch(model: nn.Module, batch: Any) -> Any:
    """Call the model on one batch: a tensor, a tuple of positional inputs, or a dict of keywords."""
    if isinstance(batch, dict) or hasattr(batch, "keys"):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


@contextmanager
def _recording(model: nn.Module, names: set[str], histograms: dict[str, dict[str, Histogram]],
               input_shapes: dict[str, tuple[int, ...]]):
    def make_hook(name: str):
        def hook(module, inputs, output):
            histograms[name]["input"].update(inputs[0])
            histograms[name]["output"].update(output)
            input_shapes.setdefault(name, tuple(inputs[0].shape))

        return hook

    handles = [
        module.register_forward_hook(make_hook(name))
        for name, module in model.named_modules()
        if name in names
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def collect_histograms(
    model: nn.Module,
    batches: Iterable[Any],
    names: Iterable[str],
    progress: bool = True,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
) -> dict[str, dict[str, Histogram]]:
    """Input and output histograms of the named modules over all calibration batches.

    `input_shapes`, when given, receives the shape of each module's first input (convolution
    kernels are timed on it).
    """
    names = set(names)
    histograms = {name: {"input": Histogram(), "output": Histogram()} for name in names}
    input_shapes = {} if input_shapes is None else input_shapes
    batches = list(batches) if batches is not None else []
    if not batches:
        raise CalibrationError(
            "calibration data is empty; pass a few representative batches (e.g. 32-128 samples)"
        )
    was_training = model.training
    model.eval()
    try:
        with _recording(model, names, histograms, input_shapes), torch.inference_mode(), Progress(
            transient=True, disable=not progress
        ) as bar:
            task = bar.add_task("calibrating", total=len(batches))
            for index, batch in enumerate(batches):
                try:
                    run_batch(model, batch)
                except LowbitError:
                    raise
                except Exception as error:
                    raise CalibrationError(
                        f"the model failed on calibration batch {index}: {error}. "
                        "Check that the batches have the shape and type the model expects."
                    ) from error
                bar.advance(task)
    finally:
        model.train(was_training)
    unseen = [name for name, pair in histograms.items() if pair["input"].batches == 0]
    if unseen:
        raise CalibrationError(f"calibration data never reached {', '.join(sorted(unseen)[:5])}")
    return histograms


def activation_ranges(
    histograms: dict[str, dict[str, Histogram]], calibrator: str, **options: float
) -> dict[str, dict[str, tuple[float, float]]]:
    """Clipping ranges per module input and output by the named calibrator."""
    return {
        name: {side: compute_range(hist, calibrator, "uint8", False, **options)
               for side, hist in pair.items()}
        for name, pair in histograms.items()
    }
