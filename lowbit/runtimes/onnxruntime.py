"""The ONNX Runtime runtime: a lowbit model exported to one ONNX graph on ONNX Runtime's fused CPU
kernels, with lowbit's integers, scales and zero points unchanged (lowbit.runtimes.onnx_modules).

`export(model)` builds the graph with the builder registered for the model's family (GRAPHS,
keyed by transformers' `model_type`; one file per family, e.g. lowbit.runtimes.onnx_bert).
`session(data)` opens it with a fixed thread count and, by default, no spinning worker threads
(a spinning session beside PyTorch more than doubled PyTorch's latency here). The loaded model is
an `nn.Module` called as the transformers original is (`input_ids`, `attention_mask`, ...),
returning the same output class with torch tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lowbit.errors import FormatError, LowbitError
from lowbit.registry import Registry
from lowbit.runtimes import RUNTIMES
from lowbit.runtimes.onnx_bert import build_bert
from lowbit.runtimes.onnx_modules import ExportError

ONNX_FILE = "model.onnx"
GraphBuilder = Callable[..., Any]
GRAPHS: Registry[GraphBuilder] = Registry("ONNX graph builder")
GRAPHS.add("bert", build_bert)


def require_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise LowbitError("the onnxruntime runtime needs ONNX Runtime: pip install 'lowbit[onnx]'") from None
    return onnxruntime


def family_of(model: nn.Module) -> str:
    """The graph builder's key for `model`: transformers' model_type."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None or model_type not in GRAPHS:
        known = ", ".join(GRAPHS)
        raise ExportError(f"{type(model).__name__} ({model_type or 'not a transformers model'}) has no ONNX "
                          f"graph builder; lowbit exports {known}")
    return model_type


def export(model: nn.Module, ops: dict[str, str] | None = None, accuracy_level: int = 0) -> bytes:
    """The serialized ONNX model of `model` (quantized or not)."""
    require_onnxruntime()
    return GRAPHS.get(family_of(model))(model, ops=ops, accuracy_level=accuracy_level).SerializeToString()


def session(model: bytes | Path, threads: int | None = None, spinning: bool = False) -> Any:
    """An ONNX Runtime CPU session on a serialized model, or on a model file (which may keep its
    weights in an external data file beside it); `threads` intra-op threads (torch's count by
    default)."""
    onnxruntime = require_onnxruntime()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    try:
        source = model if isinstance(model, bytes) else str(model)
        return onnxruntime.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as error:  # noqa: BLE001 - onnxruntime raises its own untyped errors for a bad graph
        raise FormatError(f"ONNX Runtime cannot open the model: {str(error)[:300]}") from None


class OnnxRuntimeModel(nn.Module):
    """A model that runs in an ONNX Runtime session, called like its transformers original."""

    def __init__(self, session_: Any, config: Any = None) -> None:
        super().__init__()
        self.session = session_
        self.config = config
        self.input_names = [value.name for value in session_.get_inputs()]
        self.output_names = [value.name for value in session_.get_outputs()]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, **_: Any) -> Any:
        ids = input_ids.detach().cpu().numpy().astype(np.int64, copy=False)
        given = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
        for name, tensor in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
            if tensor is not None:
                given[name] = tensor.detach().cpu().numpy()
        feeds = {name: given[name].astype(np.int64, copy=False) for name in self.input_names}
        outputs = self.session.run(None, feeds)
        return _output_class(self.output_names)(**{name: torch.from_numpy(value) for name, value
                                                   in zip(self.output_names, outputs, strict=True)})


def _output_class(names: list[str]) -> Any:
    from transformers.modeling_outputs import BaseModelOutputWithPooling, CausalLMOutput

    return CausalLMOutput if "logits" in names else BaseModelOutputWithPooling


def materialize(skeleton: nn.Module, manifest: dict[str, Any], tensors: dict[str, torch.Tensor],
                folder: Path, read: Callable[[str], bytes]) -> nn.Module:
    """The folder's model.onnx in a session (lowbit's tensors stay in the folder for the eager
    runtime; this one does not need them)."""
    entry = manifest.get("onnx")
    if entry is None:
        raise FormatError(f"{folder} records the onnxruntime runtime but no ONNX graph")
    return OnnxRuntimeModel(session(read(entry["file"])), getattr(skeleton, "config", None))


RUNTIMES.add("onnxruntime", materialize)
