"""`runtime="auto"`: build every runtime that can run a model, time each on this machine at the
input shapes given, and keep the fastest, with the measurement and the reason written down.

A model the ONNX exporter cannot express keeps the PyTorch runtime: with a warning that names
what could not be exported when its family has a graph builder, quietly when it has none.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitWarning
from lowbit.evaluate.latency import measure_latencies
from lowbit.runtimes.onnx_modules import ExportError
from lowbit.runtimes.onnxruntime import GRAPHS, export, session, wrap

LOG = logging.getLogger("lowbit")
SHAPES = ((1, 16), (8, 128))  # (batch, tokens): one short sentence, and a full batch


@dataclass
class RuntimeChoice:
    """What `auto` chose, the ONNX graph when it chose ONNX Runtime, and the record for lowbit.json."""

    runtime: str
    graph: bytes | None
    record: dict[str, Any]


def _token_batch(model: nn.Module, batch: int, tokens: int) -> dict[str, torch.Tensor]:
    """Token ids spread over the vocabulary (what an encoder or LM costs does not depend on them),
    at most as many as the model has positions."""
    vocabulary = int(getattr(model.config, "vocab_size", 1000))
    tokens = min(tokens, int(getattr(model.config, "max_position_embeddings", tokens)))
    ids = (torch.arange(batch * tokens).reshape(batch, tokens) * 7919 + 101) % max(vocabulary - 1, 1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def choose_runtime(model: nn.Module, accuracy_level: int = 0, shapes: Sequence[tuple[int, int]] = SHAPES,
                   runs: int = 10, threads: int | None = None) -> RuntimeChoice:
    """The faster of PyTorch eager and ONNX Runtime for `model`, by the geometric mean of their
    median latencies over `shapes`."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in GRAPHS:
        LOG.info("runtime auto: no ONNX graph builder for %s; the torch runtime runs it",
                 type(model).__name__)
        return RuntimeChoice("eager", None, {"chosen": "eager", "reason": "no ONNX graph builder for it"})
    try:
        graph = export(model, accuracy_level=accuracy_level)
    except ExportError as error:
        warnings.warn(f"runtime auto keeps the torch runtime: {error}", LowbitWarning, stacklevel=3)
        return RuntimeChoice("eager", None, {"chosen": "eager", "reason": f"not exportable: {error}"})
    in_onnxruntime = wrap(session(graph, threads), model.config, len(graph))
    contenders = {"eager": model.eval(), "onnxruntime": in_onnxruntime}
    medians: dict[str, dict[str, float]] = {name: {} for name in contenders}
    for batch, tokens in shapes:
        inputs = _token_batch(model, batch, tokens)
        calls = {name: (lambda m=m, inputs=inputs: m(**inputs)) for name, m in contenders.items()}
        timings = measure_latencies(calls, runs=runs, threads=threads)
        shape = "x".join(map(str, inputs["input_ids"].shape))
        for name, stats in timings.items():
            medians[name][shape] = stats.p50
    speedups = {shape: medians["eager"][shape] / medians["onnxruntime"][shape] for shape in medians["eager"]}
    mean_speedup = math.prod(speedups.values()) ** (1 / len(speedups))
    chosen = "onnxruntime" if mean_speedup > 1 else "eager"
    per_shape = ", ".join(f"{shape}: {ratio:.2f}×" for shape, ratio in speedups.items())
    reason = (f"ONNX Runtime ran {mean_speedup:.2f}× the speed of PyTorch eager (geometric mean over "
              f"{per_shape}; medians of {runs})")
    return RuntimeChoice(chosen, graph if chosen == "onnxruntime" else None,
                         {"chosen": chosen, "reason": reason, "median_ms": medians,
                          "threads": threads or torch.get_num_threads(), "accuracy_level": accuracy_level})
