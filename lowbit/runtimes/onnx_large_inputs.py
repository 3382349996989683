"""Large inputs of a MatMulNBits graph on int8 matrix kernels: the same model, another session.

ONNX Runtime 1.32's MatMulNBits is fast on a few rows and slow on many: at 1024 × 384 × 1536 it
took 8.7-9.9 ms here whatever the bits, block and accuracy level, against 1.8 ms for
DynamicQuantizeMatMul on int8 weights and 7.4 ms for float32 MatMul (AMX int8 kernels). So a
batch of many tokens runs in a second session whose every MatMulNBits is a DynamicQuantizeMatMul:
each weight row dequantized from its codes and rounded once more onto an int8 grid of its own
(symmetric, max |w| / 127; 8-bit per-channel rows land on their own integers exactly, 4-bit
values move by at most half an int8 step, about a sixteenth of the row's largest group step), activations
quantized to 8 bits per tensor at run time as lowbit's w8a8-dynamic does. Only graphs whose
MatMulNBits already quantize activations to int8 (accuracy level 4) get such a session.
`LargeInputs` opens that session on the first input above its limit (it holds the int8 weights
beside the few-row session's own); the limit is measured when the folder is saved.
On an x86 CPU without VNNI, int8 matrix kernels can saturate, so there is no such session.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lowbit.runtimes.onnx_graph import MICROSOFT, fold_constants
from lowbit.runtimes.onnx_torch import has_vnni


@dataclass
class LargeInputs:
    """Inputs of more than `above` tokens (rows) run in the session `open_session` opens (None
    where this CPU has no such session: the model's own session runs them all)."""

    above: int
    open_session: Callable[[], Any | None]
    opened: Any = field(default=None, repr=False)
    tried: bool = False

    def session_for(self, units: int) -> Any | None:
        """The large-input session for an input of `units`, or None when it is not that large."""
        if units <= self.above:
            return None
        if not self.tried:
            self.opened, self.tried = self.open_session(), True
        return self.opened


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """Unsigned 4-bit values, two per byte along the last axis, low nibble first."""
    return np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)


def dequantized_rows(node: Any, tensors: dict[str, np.ndarray]) -> np.ndarray:
    """The float weight (N, K) a MatMulNBits node multiplies by (its codes, scales, zero points)."""
    attributes = {attribute.name: attribute.i for attribute in node.attribute}
    rows, width, bits = attributes["N"], attributes["K"], attributes["bits"]
    codes = tensors[node.input[1]]
    blocks = codes.shape[1]
    values = (_nibbles(codes) if bits == 4 else codes).astype(np.float32)  # (N, blocks, block)
    scales = tensors[node.input[2]].reshape(rows, blocks)
    given = node.input[3] if len(node.input) > 3 and node.input[3] else None
    if given is None:
        zero_points = np.full((rows, blocks), 1 << (bits - 1), np.float32)
    else:
        stored = tensors[given].reshape(rows, -1)
        zero_points = (_nibbles(stored) if bits == 4 else stored)[:, :blocks].astype(np.float32)
    weight = (values - zero_points[..., None]) * scales[..., None]
    return weight.reshape(rows, -1)[:, :width]


def int8_rows(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int8 codes, one scale per row): `weight` rounded symmetrically, max |w| / 127 per row."""
    scales = np.abs(weight).max(axis=1) / 127
    scales[scales == 0] = 1
    codes = np.clip(np.rint(weight / scales[:, None]), -127, 127).astype(np.int8)
    return codes, scales.astype(np.float32)


def _int8_activations(node: Any) -> bool:
    return any(attribute.name == "accuracy_level" and attribute.i == 4 for attribute in node.attribute)


def int8_graph(data: bytes) -> bytes | None:
    """The graph with every MatMulNBits replaced by a DynamicQuantizeMatMul on int8 rows; None
    when it has none, when one computes in float (accuracy level below 4: its user asked for
    float activations), or when this CPU lacks VNNI."""
    import onnx
    from onnx import helper, numpy_helper

    model = fold_constants(onnx.load_model_from_string(data))  # weights as MatMulNBits takes them
    graph = model.graph
    matmuls = [node for node in graph.node if node.op_type == "MatMulNBits"]
    if not has_vnni() or not matmuls or not all(map(_int8_activations, matmuls)):
        return None
    tensors = {tensor.name: numpy_helper.to_array(tensor) for tensor in graph.initializer}
    used = [node.input[index] for node in graph.node if node.op_type == "MatMulNBits"
            for index in (1, 2, 3) if len(node.input) > index and node.input[index]]
    added, nodes = [], []
    for node in graph.node:
        if node.op_type != "MatMulNBits":
            nodes.append(node)
            continue
        codes, scales = int8_rows(dequantized_rows(node, tensors))
        names = [f"{node.name}_int8_{part}" for part in ("weight", "scale", "zero_point")]
        added += [numpy_helper.from_array(np.ascontiguousarray(codes.T), names[0]),
                  numpy_helper.from_array(scales, names[1]),
                  numpy_helper.from_array(np.zeros(len(scales), np.int8), names[2])]
        bias = [node.input[5]] if len(node.input) > 5 and node.input[5] else []
        nodes.append(helper.make_node("DynamicQuantizeMatMul", [node.input[0], *names, *bias],
                                      list(node.output), name=node.name, domain=MICROSOFT))
    kept = [tensor for tensor in graph.initializer if tensor.name not in set(used)]
    del graph.node[:], graph.initializer[:]
    graph.node.extend(nodes)
    graph.initializer.extend([*kept, *added])
    return model.SerializeToString()
