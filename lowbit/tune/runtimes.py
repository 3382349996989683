"""Objective latency across runtimes: an accepted trial runs in PyTorch eager and, where it
exports, in ONNX Runtime, and the faster one that still meets the budget is the trial's.

ONNX Runtime is tried at accuracy level 0 (float activations, lowbit's numerics) and, when the
graph holds MatMulNBits, at level 4 (int8 activations per block, faster, slightly less exact).
Its numerics are not PyTorch's (DynamicQuantizeMatMul quantizes activations per tensor, level 4
per block), so a runtime is taken only after the trial's metric is measured again in it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from torch import nn

from lowbit.errors import LowbitError
from lowbit.runtimes.onnxruntime import export, open_model

LOG = logging.getLogger("lowbit")
EAGER, ONNXRUNTIME = "eager", "onnxruntime"


def onnx_variants(model: nn.Module) -> Iterator[tuple[int, nn.Module]]:
    """(accuracy level, `model` in an ONNX Runtime session) for level 0, and for level 4 when
    the graph holds MatMulNBits (elsewhere the two graphs are the same); nothing when the model
    cannot be exported or ONNX Runtime is not installed."""
    config = getattr(model, "config", None)
    for level in (0, 4):
        try:
            graph = export(model, accuracy_level=level)
        except LowbitError as error:  # ExportError, or onnxruntime missing
            LOG.info("tune: %s stays in PyTorch (%s)", type(model).__name__, error)
            return
        yield level, open_model(graph, config)
        if b"MatMulNBits" not in graph:
            return


def runtime_fields(level: int | None, timing: dict[str, Any]) -> dict[str, Any]:
    """A trial's runtime fields: eager when `level` is None, else ONNX Runtime at that level."""
    runtime = EAGER if level is None else ONNXRUNTIME
    return {**timing, "runtime": runtime, "accuracy_level": level}
