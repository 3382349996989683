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
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitWarning
from lowbit.evaluate.latency import measure_latencies
from lowbit.runtimes.onnx_large_inputs import int8_graph
from lowbit.runtimes.onnx_modules import ExportError
from lowbit.runtimes.onnxruntime import GRAPHS, export, open_model

LOG = logging.getLogger("lowbit")
SHAPES = ((1, 16), (8, 128))  # (batch, tokens): one short sentence, and a full batch
# Inputs of at least 64 tokens are timed on the int8 session against MatMulNBits: below that,
# MatMulNBits keeps every input, as its per-block int8 activations keep a 4-bit model's quality
# (the int8 session's per-tensor ones cost MiniLM w4 0.004 of embedding cosine, 0.955 to 0.951).
LARGE_TOKENS = 64


def _large_shapes(positions: int) -> list[tuple[int, int]]:
    """(batch, tokens) from LARGE_TOKENS tokens up: one sequence growing to 512 tokens (or the
    model's positions), then batches of 2, 4 and 8 such sequences."""
    longest = min(512, positions)
    singles = [(1, tokens) for tokens in (64, 128, 256, 512) if tokens <= longest]
    return singles + [(batch, longest) for batch in (2, 4, 8) if batch * longest >= LARGE_TOKENS]


@dataclass
class LargeInputPlan:
    """Inputs of more than `above` tokens run on int8 matrix kernels (None: none do); `timing`
    is what was measured to set it."""

    above: int | None = None
    timing: dict[str, list[float]] | None = None

    def entry(self) -> dict[str, Any]:
        """The fields of lowbit.json's `onnx` entry that record it."""
        return {"large_inputs_above": self.above, "large_input_timing": self.timing}


@dataclass
class RuntimeChoice:
    """What `auto` chose, the ONNX graph when it chose ONNX Runtime, and the record for lowbit.json."""

    runtime: str
    graph: bytes | None
    record: dict[str, Any]
    large_inputs: LargeInputPlan = field(default_factory=LargeInputPlan)


def _token_batch(model: nn.Module, batch: int, tokens: int) -> dict[str, torch.Tensor]:
    """Token ids spread over the vocabulary (what an encoder or LM costs does not depend on them),
    at most as many as the model has positions."""
    vocabulary = int(getattr(model.config, "vocab_size", 1000))
    tokens = min(tokens, int(getattr(model.config, "max_position_embeddings", tokens)))
    ids = (torch.arange(batch * tokens).reshape(batch, tokens) * 7919 + 101) % max(vocabulary - 1, 1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _inputs(model: nn.Module, batch: int, tokens: int) -> tuple[str, tuple, dict[str, torch.Tensor]]:
    """(shape label, positional, keyword inputs) to time a model with: token ids for a transformers
    model, its example input repeated to `batch` rows for a plain one."""
    if getattr(model, "config", None) is not None:
        inputs = _token_batch(model, batch, tokens)
        return "x".join(map(str, inputs["input_ids"].shape)), (), inputs
    example = model.lowbit_example_input
    rows = example[:1].expand(batch, *example.shape[1:]).contiguous()
    return "x".join(map(str, rows.shape)), (rows,), {}


def plan_large_inputs(model: nn.Module, graph: bytes, threads: int | None = None,
                      runs: int = 5) -> LargeInputPlan:
    """Time `graph`'s MatMulNBits session against its int8 one (lowbit.runtimes.onnx_large_inputs)
    on growing token batches: inputs larger than the last size at which the int8 session lost run
    on it. Only encoders with MatMulNBits nodes have such a session (a causal LM decodes in one
    session; plain models hold none), and only on CPUs with VNNI."""
    config = getattr(model, "config", None)
    if config is None or hasattr(model, "generate") or int8_graph(graph) is None:
        return LargeInputPlan()
    positions = int(getattr(config, "max_position_embeddings", 512) or 512)
    shapes = _large_shapes(positions)
    inputs = {batch * tokens: _token_batch(model, batch, tokens) for batch, tokens in shapes}
    small = open_model(graph, config, threads)
    large = open_model(graph, config, threads, large_inputs_above=0)
    timing: dict[str, list[float]] = {"tokens": [], "matmul_nbits_ms": [], "int8_ms": []}
    above = None
    with torch.inference_mode():
        for tokens, batch in inputs.items():
            medians = measure_latencies({name: (lambda m=m, b=batch: m(**b)) for name, m in
                                         (("nbits", small), ("int8", large))}, runs=runs, threads=threads)
            for key, value in (("tokens", tokens), ("matmul_nbits_ms", medians["nbits"].p50),
                               ("int8_ms", medians["int8"].p50)):
                timing[key].append(round(float(value), 4))
            if medians["int8"].p50 < medians["nbits"].p50:
                above = timing["tokens"][-2] if len(timing["tokens"]) > 1 else LARGE_TOKENS - 1
                break
    LOG.info("inputs above %s tokens run on int8 matrix kernels", above)
    return LargeInputPlan(None if above is None else int(above), timing)


def _no_graph_reason(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "model_type", None) not in GRAPHS:
        return "no ONNX graph builder for it"
    if config is None and not isinstance(getattr(model, "lowbit_example_input", None), torch.Tensor):
        return "no example input to export it with (a plain model quantized without tensor batches)"
    return None


def choose_runtime(model: nn.Module, accuracy_level: int = 0, shapes: Sequence[tuple[int, int]] = SHAPES,
                   runs: int = 10, threads: int | None = None,
                   activation_block: int | None = None) -> RuntimeChoice:
    """The faster of PyTorch eager and ONNX Runtime for `model`, by the geometric mean of their
    median latencies over `shapes` (batch, tokens; a plain model takes the batch sizes)."""
    reason = _no_graph_reason(model)
    if reason is not None:
        LOG.info("runtime auto: %s (%s); the torch runtime runs it", reason, type(model).__name__)
        return RuntimeChoice("eager", None, {"chosen": "eager", "reason": reason})
    try:
        graph = export(model, accuracy_level=accuracy_level, activation_block=activation_block)
    except ExportError as error:
        warnings.warn(f"runtime auto keeps the torch runtime: {error}", LowbitWarning, stacklevel=3)
        return RuntimeChoice("eager", None, {"chosen": "eager", "reason": f"not exportable: {error}"})
    plan = plan_large_inputs(model, graph, threads)
    in_onnxruntime = open_model(graph, getattr(model, "config", None), threads, plan.above)
    contenders = {"eager": model.eval(), "onnxruntime": in_onnxruntime}
    medians: dict[str, dict[str, float]] = {name: {} for name in contenders}
    for batch, tokens in shapes:
        shape, args, kwargs = _inputs(model, batch, tokens)
        calls = {name: (lambda m=m, args=args, kwargs=kwargs: m(*args, **kwargs))
                 for name, m in contenders.items()}
        timings = measure_latencies(calls, runs=runs, threads=threads)
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
                          "threads": threads or torch.get_num_threads(), "accuracy_level": accuracy_level},
                         plan)
