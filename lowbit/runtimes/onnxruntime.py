"""The ONNX Runtime runtime: a lowbit model exported to one ONNX graph on ONNX Runtime's fused CPU
kernels, with lowbit's integers, scales and zero points unchanged (lowbit.runtimes.onnx_modules).

`export(model)` builds the graph with the builder registered for the model's family (GRAPHS,
keyed by transformers' `model_type`, one file per family, e.g. lowbit.runtimes.onnx_bert; "torch"
for a plain PyTorch model, lowbit.runtimes.onnx_torch).
`session(data)` opens it with a fixed thread count, its worker threads spinning only while a run
is in flight (left spinning, they more than doubled the latency of PyTorch beside them here).
The loaded model is an `nn.Module` called as the original is: a transformers model with
`input_ids`, `attention_mask`, ..., returning the same output class; a plain model with tensors.
`open_model` gives it a second session for large inputs where the folder recorded one
(lowbit.runtimes.onnx_large_inputs).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.errors import FormatError
from lowbit.registry import Registry
from lowbit.runtimes import RUNTIMES
from lowbit.runtimes.onnx_bert import build_bert, fused_ops
from lowbit.runtimes.onnx_generate import OnnxCausalLM
from lowbit.runtimes.onnx_large_inputs import LargeInputs, int8_graph
from lowbit.runtimes.onnx_llama import build_llama
from lowbit.runtimes.onnx_modules import BLOCKS, ExportError, op_name
from lowbit.runtimes.onnx_session import (
    OnnxRuntimeModel,
    OnnxTensorModel,
    check_graph,
    require_onnxruntime,
    session,
)
from lowbit.runtimes.onnx_shared import inline_stored
from lowbit.runtimes.onnx_torch import build_torch, for_this_cpu

ONNX_FILE = "model.onnx"
GraphBuilder = Callable[..., Any]
GRAPHS: Registry[GraphBuilder] = Registry("ONNX graph builder")
GRAPHS.add("bert", build_bert)
GRAPHS.add("llama", build_llama)
GRAPHS.add("torch", build_torch)
# Per family, the Linears whose graph fuses them into another op than onnx_modules.op_name's default.
FUSED_OPS: Registry[Callable[[nn.Module], dict[str, str]]] = Registry("ONNX fused-op listing")
FUSED_OPS.add("bert", fused_ops)


def family_of(model: nn.Module) -> str:
    """The graph builder's key for `model`: transformers' model_type, or "torch" for a plain model."""
    config = getattr(model, "config", None)
    if config is None:
        return "torch"
    model_type = getattr(config, "model_type", None)
    if model_type is None or model_type not in GRAPHS:
        known = ", ".join(GRAPHS)
        raise ExportError(f"{type(model).__name__} ({model_type or 'not a transformers model'}) has no ONNX "
                          f"graph builder; lowbit exports {known}")
    return model_type


def layer_ops(modules: dict[str, nn.Module], model: nn.Module) -> dict[str, str]:
    """The ONNX op that runs each of `modules` (by name) in `model`'s graph (what `inspect` shows)."""
    ops = {name: op_name(module) for name, module in modules.items()}
    family = family_of(model)
    fused = FUSED_OPS.get(family)(model) if family in FUSED_OPS else {}
    return {name: fused.get(name, op) for name, op in ops.items()}


ACTIVATION_BLOCKS = tuple(sorted(BLOCKS))  # the MatMulNBits block lengths lowbit writes


def export(model: nn.Module, ops: dict[str, str] | None = None, accuracy_level: int = 0,
           activation_block: int | None = None) -> bytes:
    """The serialized ONNX model of `model` (quantized or not). `activation_block` caps the
    MatMulNBits block: at accuracy level 4 activations are quantized to int8 per block, so a
    smaller block is more exact and slower (SmolLM2 w4-g64: 138 tok/s at +0.6% perplexity over
    lowbit's PyTorch run with blocks of 64, 87 tok/s at -0.05% with 16; bench/README.md)."""
    require_onnxruntime()
    if activation_block is not None and activation_block not in ACTIVATION_BLOCKS:
        raise ExportError(f"activation_block {activation_block} is not one of {ACTIVATION_BLOCKS}")
    builder = GRAPHS.get(family_of(model))
    graph = builder(model, ops=ops, accuracy_level=accuracy_level, max_block=activation_block)
    return graph.SerializeToString()


def materialize(skeleton: nn.Module, manifest: dict[str, Any], tensors: dict[str, torch.Tensor],
                folder: Path, read: Callable[[str], bytes]) -> nn.Module:
    """The folder's model.onnx in a session, its weights read from the folder's checked tensor
    file (lowbit.runtimes.onnx_shared)."""
    entry = manifest.get("onnx")
    if entry is None:
        raise FormatError(f"{folder} records the onnxruntime runtime but no ONNX graph")
    where = f"{folder}/{entry['file']}"
    data = inline_stored(read(entry["file"]), read, where)
    check_graph(data, where)
    return open_model(for_this_cpu(data), getattr(skeleton, "config", None),
                      large_inputs_above=entry.get("large_inputs_above"))


def open_model(graph: bytes, config: Any = None, threads: int | None = None,
               large_inputs_above: int | None = None) -> OnnxRuntimeModel:
    """`graph` in a session of `threads` (torch's count by default), as the model class `wrap`
    picks. With `large_inputs_above`, inputs of more tokens (rows) than that run on int8 matrix
    kernels in a second session, opened when the first one comes (lowbit.runtimes.onnx_large_inputs)."""

    def open_int8() -> Any:
        rewritten = int8_graph(graph)
        return None if rewritten is None else session(rewritten, threads)
    large = None if large_inputs_above is None else LargeInputs(large_inputs_above, open_int8)
    return wrap(session(graph, threads), config, len(graph), large)


def wrap(session_: Any, config: Any = None, model_bytes: int | None = None,
         large_inputs: LargeInputs | None = None) -> OnnxRuntimeModel:
    """The model class for a session: a causal LM (with `generate`) when the graph gives logits,
    a transformers encoder when it takes token ids, else a model called with tensors."""
    outputs = {value.name for value in session_.get_outputs()}
    inputs = {value.name for value in session_.get_inputs()}
    if "logits" in outputs:
        return OnnxCausalLM(session_, config, model_bytes)
    kind = OnnxRuntimeModel if "input_ids" in inputs else OnnxTensorModel
    return kind(session_, config, model_bytes, large_inputs)


RUNTIMES.add("onnxruntime", materialize)
