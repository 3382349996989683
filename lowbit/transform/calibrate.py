"""Calibration: run data through a model and fill one activation histogram per watched module.

`calibrate` returns a `CalibrationResult`: the histograms (one pass over the data serves every
calibrator), updatable with more data, saved as safetensors, and passed to `quantize` so that
many trials share one calibration run.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.core import CALIBRATORS, Histogram, compute_range
from lowbit.core.calibrators import expected_squared_error
from lowbit.core.qtypes import UINT7, UINT8
from lowbit.data.batches import call_model
from lowbit.errors import CalibrationError, LowbitError
from lowbit.nn.hooks import forward_hooks
from lowbit.nn.kinds import module_kind
from lowbit.progress import progress_bar
from lowbit.registry import Registry
from lowbit.transform.fold import fold_batch_norms, links_for, tensor_sources

AUTO = "auto"
# "save" -> how a CalibrationResult is written to a file; lowbit.formats.calibration fills it
FILES: Registry[Callable[..., Path]] = Registry("calibration file writer")
# The static scheme quantizes a module's input on a 7-bit grid and its output on an 8-bit one.
SIDE_QTYPES = {"input": UINT7, "output": UINT8}


def _recording(model: nn.Module, names: set[str], histograms: dict[str, dict[str, Histogram]],
               input_shapes: dict[str, tuple[int, ...]], made_by: dict[int, str]):
    """Forward hooks that add each named module's input and output to its histograms, and note
    which module made each output storage (`made_by`; the last to write one owns it: a storage
    the model returns is alive, so no later module can reuse it)."""
    def make_hook(name: str):
        def hook(module, inputs, output):
            histograms[name]["input"].update(inputs[0])
            histograms[name]["output"].update(output)
            input_shapes.setdefault(name, tuple(inputs[0].shape))
            if isinstance(output, torch.Tensor) and output.numel():
                made_by[output.untyped_storage().data_ptr()] = name

        return hook

    return forward_hooks(model, names, make_hook)


def collect_histograms(
    model: nn.Module,
    batches: Iterable[Any],
    names: Iterable[str],
    progress: bool = True,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    outputs: list[str] | None = None,
) -> dict[str, dict[str, Histogram]]:
    """Input and output histograms of the named modules over all calibration batches.

    `input_shapes`, when given, receives the shape of each module's first input (convolution
    kernels are timed on it); `outputs` the named modules whose output (itself or a view of it)
    the model returns on the first batch (a classifier's logits, a language model's head): nothing
    reads those on an int8 grid, so a static module there leaves its output float
    (LayerSpec.output).
    """
    names = set(names)
    histograms = {name: {"input": Histogram(), "output": Histogram()} for name in names}
    input_shapes = {} if input_shapes is None else input_shapes
    batches = list(batches) if batches is not None else []
    if not batches:
        raise CalibrationError(
            "calibration data is empty; pass a few representative batches (e.g. 32-128 samples)"
        )
    made_by: dict[int, str] = {}
    was_training = model.training
    model.eval()
    try:
        with _recording(model, names, histograms, input_shapes, made_by), torch.inference_mode(), \
                progress_bar(progress) as bar:
            task = bar.add_task("calibrating", total=len(batches))
            for index, batch in enumerate(batches):
                try:
                    returned = call_model(model, batch)
                except LowbitError:
                    raise
                except Exception as error:
                    raise CalibrationError(
                        f"the model failed on calibration batch {index}: {error}. "
                        "Check that the batches have the shape and type the model expects."
                    ) from error
                if index == 0 and outputs is not None:
                    found = {made_by.get(tensor.untyped_storage().data_ptr())
                             for tensor in _tensors_in(returned)}
                    outputs.extend(sorted(name for name in found if name is not None))
                made_by.clear()
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
    """Clipping ranges per module input and output by the named calibrator, or by the best one
    for each tensor with `calibrator="auto"` (see `best_range`)."""
    if calibrator == AUTO:
        return {name: {side: best_range(hist, SIDE_QTYPES[side])[1] for side, hist in pair.items()}
                for name, pair in histograms.items()}
    return {
        name: {side: compute_range(hist, calibrator, "uint8", False, **options)
               for side, hist in pair.items()}
        for name, pair in histograms.items()
    }


def best_range(histogram: Histogram, qtype=UINT8) -> tuple[str, tuple[float, float]]:
    """The calibrator whose range gives this tensor the least expected squared quantization
    error on `qtype`'s grid, and that range: one histogram scores them all."""
    scored = {}
    for name in CALIBRATORS:
        low, high = compute_range(histogram, name, "uint8", False)
        scored[name] = (expected_squared_error(histogram, low, high, qtype, False), (low, high))
    best = min(scored, key=lambda name: scored[name][0])
    return best, scored[best][1]


@dataclass
class CalibrationResult:
    """Activation histograms of a model's modules, from `calibrate`.

    `ranges(calibrator)` turns them into clipping ranges ("auto" picks the best calibrator per
    tensor); `update(batches)` adds data; `save(path)` / `load_calibration(path)` keep them.
    """

    histograms: dict[str, dict[str, Histogram]]
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    model: nn.Module | None = field(default=None, repr=False, compare=False)
    folded: dict[str, str] = field(default_factory=dict)  # {batch norm: conv} folded before recording
    sources: dict[str, str] = field(default_factory=dict)  # {conv: module whose output it reads}
    outputs: list[str] = field(default_factory=list)  # modules whose output the model returns

    def ranges(self, calibrator: str = AUTO, names: Iterable[str] | None = None,
               **options: float) -> dict[str, dict[str, Any]]:
        """{module: {"input": (low, high), "output": (low, high), "input_shape": shape}}."""
        wanted = list(self.histograms) if names is None else list(names)
        missing = [name for name in wanted if name not in self.histograms]
        if missing:
            raise CalibrationError(f"the calibration has no data for {', '.join(missing[:5])}; "
                                   "calibrate the same model (or these modules) first")
        ranges = activation_ranges({name: self.histograms[name] for name in wanted}, calibrator, **options)
        for name in wanted:
            if name in self.input_shapes:
                ranges[name]["input_shape"] = self.input_shapes[name]
        return ranges

    def best_calibrators(self) -> dict[str, dict[str, str]]:
        """The calibrator "auto" picks for each module's input and output."""
        return {name: {side: best_range(hist, SIDE_QTYPES[side])[0] for side, hist in pair.items()}
                for name, pair in self.histograms.items()}

    def update(self, batches: Iterable[Any], progress: bool = True) -> CalibrationResult:
        """Add more batches to the same histograms (needs the model it was calibrated on)."""
        if self.model is None:
            raise CalibrationError("this calibration was loaded from a file; pass it to "
                                   "load_calibration(path, model) to update it")
        more = collect_histograms(self.model, batches, self.histograms, progress, self.input_shapes)
        for name, pair in more.items():
            for side, histogram in pair.items():
                self.histograms[name][side] = merge_histograms(self.histograms[name][side], histogram)
        return self

    def save(self, path: str | os.PathLike) -> Path:
        """One safetensors file: every histogram, with the input shapes in its metadata (written
        atomically by lowbit.formats.calibration, which registers itself in FILES)."""
        return FILES.get("save")(self, Path(path))

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """(tensors named module::side::part, metadata): what a calibration file holds."""
        tensors = {f"{name}::{side}::{key}": value
                   for name, pair in self.histograms.items()
                   for side, histogram in pair.items()
                   for key, value in histogram.state_dict().items()}
        metadata = {"format": "lowbit-calibration", "version": "1",
                    "input_shapes": json.dumps({k: list(v) for k, v in self.input_shapes.items()}),
                    "folded": json.dumps(self.folded), "sources": json.dumps(self.sources),
                    "outputs": json.dumps(self.outputs)}
        return tensors, metadata

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                     model: nn.Module | None = None) -> CalibrationResult:
        """The result `to_tensors` described (the caller checks the file first)."""
        states: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
        for key, value in tensors.items():
            name, side, part = key.split("::")
            states.setdefault(name, {}).setdefault(side, {})[part] = value
        histograms = {name: {side: Histogram.from_state_dict(state) for side, state in pair.items()}
                      for name, pair in states.items()}
        shapes = {k: tuple(v) for k, v in json.loads(metadata.get("input_shapes", "{}")).items()}
        folded = json.loads(metadata.get("folded", "{}"))
        sources = json.loads(metadata.get("sources", "{}"))
        outputs = json.loads(metadata.get("outputs", "[]"))
        return cls(histograms, shapes, _folded_copy(model, folded), folded, sources, outputs)


def merge_histograms(first: Histogram, second: Histogram) -> Histogram:
    """One histogram holding both: the counts of the narrower are re-binned, by bin centre, onto
    the wider one's range."""
    wide, narrow = (first, second) if first.limit >= second.limit else (second, first)
    merged = Histogram.from_state_dict(wide.state_dict())
    if narrow.total and merged.limit == 0:  # only zeros on both sides: they sit in the middle bin
        merged.counts[merged.bins // 2] += narrow.total
    elif narrow.total:
        span = (-merged.limit, merged.limit)
        merged.counts += torch.histogram(narrow.centers(), bins=merged.bins, range=span,
                                         weight=narrow.counts).hist.double()
    merged.min, merged.max = min(first.min, second.min), max(first.max, second.max)
    batches = first.batches + second.batches
    merged.average_min = (first.average_min * first.batches + second.average_min * second.batches) / batches
    merged.average_max = (first.average_max * first.batches + second.average_max * second.batches) / batches
    merged.batches = batches
    return merged


def calibratable_modules(model: nn.Module) -> list[str]:
    """Names of the modules whose activations a static scheme quantizes (Linear and Conv2d)."""
    return [name for name, module in model.named_modules() if module_kind(module) in ("linear", "conv")]


def calibrate(
    model: nn.Module, batches: Iterable[Any], names: Iterable[str] | None = None, progress: bool = True,
) -> CalibrationResult:
    """One pass of `batches` through `model`, recording every Linear and Conv2d input and output
    (or only `names`). Pass the result to `quantize(..., calibration=result)`. Batch norms that
    quantizing folds are folded first, on a copy (lowbit.transform.fold)."""
    names = list(names) if names is not None else calibratable_modules(model)
    if not names:
        raise CalibrationError("the model has no Linear or Conv2d module to calibrate")
    links = links_for(model, names)
    subject = _folded_copy(model, links.batch_norms)
    batches = list(batches) if batches is not None else []
    shapes: dict[str, tuple[int, ...]] = {}
    outputs: list[str] = []
    histograms = collect_histograms(subject, batches, names, progress, shapes, outputs)
    modules = dict(subject.named_modules())
    unlinked = [name for name in names
                if isinstance(modules[name], nn.Conv2d) and name not in links.producers]
    sources = tensor_sources(subject, batches[0], unlinked) if unlinked else {}
    return CalibrationResult(histograms, shapes, subject, links.batch_norms, sources, outputs)


def _tensors_in(value: Any) -> list[torch.Tensor]:
    """The tensors in a model's output: itself, or those in its tuples, lists and dicts."""
    if isinstance(value, torch.Tensor):
        return [value] if value.numel() else []
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (tuple, list)) else ()
    return [tensor for item in items for tensor in _tensors_in(item)]


def _folded_copy(model: nn.Module | None, folded: dict[str, str]) -> nn.Module | None:
    """`model` with `folded` batch norms folded, on a copy (the model itself when none is)."""
    if model is None or not folded:
        return model
    copied = copy.deepcopy(model)
    fold_batch_norms(copied, folded)
    return copied
