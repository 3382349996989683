"""An ONNX Runtime CPU session, and a model that runs in one, called like its transformers original
(`input_ids`, `attention_mask`, ...) and returning the same output class with torch tensors."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lowbit.errors import FormatError, LowbitError
from lowbit.runtimes.onnx_large_inputs import LargeInputs


def require_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise LowbitError("the onnxruntime runtime needs ONNX Runtime: pip install 'lowbit[onnx]'") from None
    return onnxruntime


DOMAINS = {"", "ai.onnx", "com.microsoft"}  # ONNX's own ops and ONNX Runtime's contrib ops


def _tensors(graph: Any) -> Any:
    """Every tensor a graph stores: initializers, and constants inside nodes and subgraphs."""
    from onnx import AttributeProto

    yield from graph.initializer
    yield from (sparse.values for sparse in graph.sparse_initializer)
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == AttributeProto.TENSOR:
                yield attribute.t
            yield from attribute.tensors
            subgraphs = [attribute.g] if attribute.type == AttributeProto.GRAPH else []
            for subgraph in [*subgraphs, *attribute.graphs]:
                yield from _tensors(subgraph)


def check_graph(data: bytes, where: str) -> None:
    """Refuse an ONNX model read from a folder that could reach outside it or load code: a tensor
    kept in an external data file (ONNX Runtime would read that file, relative to the working
    directory), or an op domain other than ONNX's and ONNX Runtime's own."""
    import onnx

    try:
        model = onnx.load_model_from_string(data)
    except Exception as error:  # noqa: BLE001 - protobuf's decode errors are untyped
        raise FormatError(f"{where} is not an ONNX model: {str(error)[:200]}") from None
    domains = {opset.domain for opset in model.opset_import} | {node.domain for node in model.graph.node}
    if not domains <= DOMAINS:
        raise FormatError(f"{where} uses op domains {sorted(domains - DOMAINS)}; lowbit runs only ONNX's and "
                          "ONNX Runtime's own ops")
    if any(tensor.data_location == onnx.TensorProto.EXTERNAL for tensor in _tensors(model.graph)):
        raise FormatError(f"{where} keeps tensors in external files; lowbit reads only the model file itself")


def session(model: bytes | Path, threads: int | None = None, spinning: bool = False,
            fuse_skip_norm: bool = False) -> Any:
    """An ONNX Runtime CPU session on a serialized model, or on a model file (which may keep its
    weights in an external data file beside it); `threads` intra-op threads (torch's count by
    default).

    Worker threads spin while a run is in flight and stop when it returns
    (`session.force_spinning_stop`): parked between ops, they cost MiniLM 30% at batch 1 (3.4 →
    2.4 ms), and left spinning after a run, they more than doubled the latency of PyTorch timed
    next to them. `spinning=True` keeps them spinning between runs too (ONNX Runtime's default).

    The optimizer does not fuse a residual Add into the LayerNormalization after it: ONNX Runtime
    1.32's fused SkipLayerNormalization is 5.7-6.6× slower than the two nodes (lowbit.runtimes.onnx_bert).
    `fuse_skip_norm=True` lets it (ONNX Runtime's default, how a peer's graph runs for its users).
    """
    onnxruntime = require_onnxruntime()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")
    options.add_session_config_entry("session.force_spinning_stop", "0" if spinning else "1")
    if not fuse_skip_norm:
        options.add_session_config_entry("optimization.disable_specified_optimizers", "SkipLayerNormFusion")
    options.log_severity_level = 3  # errors only: its graph warnings go to stdout and mean nothing here
    try:
        source = model if isinstance(model, bytes) else str(model)
        return onnxruntime.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as error:  # noqa: BLE001 - onnxruntime raises its own untyped errors for a bad graph
        raise FormatError(f"ONNX Runtime cannot open the model: {str(error)[:300]}") from None


class OnnxRuntimeModel(nn.Module):
    """A model that runs in an ONNX Runtime session, called like its transformers original. With
    `large_inputs`, inputs of many tokens (rows) run in a second session on int8 matrix kernels
    (lowbit.runtimes.onnx_large_inputs)."""

    def __init__(self, session_: Any, config: Any = None, model_bytes: int | None = None,
                 large_inputs: LargeInputs | None = None) -> None:
        super().__init__()
        self.session = session_
        self.config = config
        self.model_bytes = model_bytes  # the graph's size: what it holds in memory, for reports
        self.large_inputs = large_inputs
        self.input_names = [value.name for value in session_.get_inputs()]
        self.output_names = [value.name for value in session_.get_outputs()]

    def session_for(self, units: int) -> Any:
        """The session that runs an input of `units` tokens (rows)."""
        large = self.large_inputs.session_for(units) if self.large_inputs is not None else None
        return self.session if large is None else large

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, **_: Any) -> Any:
        ids = _array(input_ids, np.int64)
        given = {"input_ids": ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        defaults = {"attention_mask": np.ones_like, "token_type_ids": np.zeros_like}
        feeds = {name: _array(given[name], np.int64) if given[name] is not None else defaults[name](ids)
                 for name in self.input_names}
        outputs = self.session_for(ids.size).run(None, feeds)
        return self.output_class(**dict(zip(self.output_names, map(torch.from_numpy, outputs), strict=True)))

    @functools.cached_property
    def output_class(self) -> Any:
        return _output_class(self.output_names)


class OnnxTensorModel(OnnxRuntimeModel):
    """A plain model (lowbit.runtimes.onnx_torch) in a session: tensors in, a tensor out."""

    def forward(self, *inputs: torch.Tensor) -> Any:
        if len(inputs) != len(self.input_names):
            raise LowbitError(f"this model takes {len(self.input_names)} tensor(s), got {len(inputs)}")
        feeds = {name: _array(tensor, np.float32)
                 for name, tensor in zip(self.input_names, inputs, strict=True)}
        outputs = self.session_for(inputs[0].shape[0]).run(None, feeds)
        return torch.from_numpy(outputs[0]) if len(outputs) == 1 else tuple(map(torch.from_numpy, outputs))


def _array(tensor: torch.Tensor | np.ndarray, dtype: type) -> np.ndarray:
    """`tensor` as the numpy array of `dtype` a graph input takes (a view when it already is one)."""
    array = tensor if isinstance(tensor, np.ndarray) else tensor.detach().cpu().numpy()
    return array.astype(dtype, copy=False)


def _output_class(names: list[str]) -> Any:
    from transformers.modeling_outputs import BaseModelOutputWithPooling, CausalLMOutput

    return CausalLMOutput if "logits" in names else BaseModelOutputWithPooling
