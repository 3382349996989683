"""lowbit's quantized modules as ONNX Runtime nodes, on lowbit's own integers, scales and zero points.

Whatever algorithm rounded a weight, its integers go into the graph unchanged:

- `matmul_nbits`: `com.microsoft.MatMulNBits`, 4 or 8 bits in blocks along the input dimension.
  int4 groups map one to one (lowbit packs two values per byte, low nibble first, as MatMulNBits
  does). int8 weights become unsigned codes (+128, zero point 128; a node flips the sign bit of
  lowbit's own bytes), per-channel scales repeated over blocks. `accuracy_level` 0 computes in
  float32 from the dequantized weight (equal to lowbit's reference); 4 quantizes activations to
  int8 per block, as llama.cpp does.
- `dynamic_quantize_matmul`: `com.microsoft.DynamicQuantizeMatMul`, symmetric int8 weights and
  activations quantized to uint8 per tensor at run time (lowbit's `w8a8-dynamic`).
- `float`: MatMul on the dequantized weight, for what neither expresses.

Each weight enters the graph as the bytes lowbit stores (a Linear's (out, in) matrix, a stacked
projection's parts one by one), with small nodes that ONNX Runtime folds when it opens the session
(lowbit.runtimes.onnx_graph), so a folder keeps its weights once (lowbit.runtimes.onnx_shared).

Embeddings gather quantized rows with `com.microsoft.GatherBlockQuantized`, so the table stays
small in the file and in memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.nn.qlinear import QLinear
from lowbit.registry import Registry
from lowbit.runtimes.onnx_graph import MICROSOFT, Graph

BLOCKS = (128, 64, 32, 16)  # block sizes MatMulNBits and GatherBlockQuantized take, largest first
GROUP_BLOCKS = (16, 32, 64, 128, 256)  # lowbit's groups (int4, int5, int8) that are MatMulNBits blocks


class ExportError(LowbitError):
    """A module or model the ONNX exporter cannot express; the message names it."""


LinearOp = Callable[[Graph, nn.Module, str, int], str]
LINEAR_OPS: Registry[LinearOp] = Registry("ONNX linear op")


def _spec(module: nn.Module) -> Any:
    return getattr(module, "spec", None)


def linear_ops_for(module: nn.Module) -> list[str]:
    """The ops that can run this Linear with lowbit's numerics, the default first; none for a
    scheme ONNX Runtime has no kernel for here (static activations)."""
    spec = _spec(module)
    if spec is None or spec.weight in ("fp16", "bf16"):
        return ["float"]  # a float Linear, or 16-bit weights computed in float32 as lowbit does
    if spec.weight in ("int4", "int5"):
        return ["matmul_nbits"] if _whole_group_block(module) else []
    if spec.weight != "int8" or not spec.symmetric:
        return []
    if spec.granularity.startswith("group:"):  # weight-only; a group is a block as it is
        return ["matmul_nbits"] if int(spec.granularity[6:]) in GROUP_BLOCKS else []
    blocks = ["matmul_nbits"] if _int8_block(module.in_features) else []
    if spec.scheme == "dynamic":  # activations int8 per tensor (DynamicQuantizeMatMul) or per block
        return ["dynamic_quantize_matmul", *blocks]
    return blocks if spec.scheme == "weight_only" else []


OP_NAMES = {"matmul_nbits": "MatMulNBits", "dynamic_quantize_matmul": "DynamicQuantizeMatMul",
            "float": "MatMul"}


def op_name(module: nn.Module) -> str:
    """The ONNX Runtime op that runs `module` by default (what `lowbit inspect` shows). Static
    convolutions and Linears exist only in plain torch graphs (lowbit.runtimes.onnx_torch)."""
    spec = _spec(module)
    if spec is not None and spec.scheme == "static":
        return "QLinearConv" if hasattr(module, "out_channels") else "QGemm"
    if hasattr(module, "out_channels"):
        return "Conv"
    if hasattr(module, "num_embeddings"):
        spec = _spec(module)
        quantized = spec is not None and spec.weight in ("int4", "int5", "int8")
        return "GatherBlockQuantized" if quantized else "Gather"
    ops = linear_ops_for(module)
    return OP_NAMES[ops[0]] if ops else "none"


def emit_linear(graph: Graph, module: nn.Module, x: str, name: str, op: str | None = None,
                accuracy_level: int = 0) -> str:
    """`x @ W.T + b` for `module` (a QLinear or a float Linear); `op` picks one of
    `linear_ops_for(module)` (the first by default)."""
    ops = linear_ops_for(module)
    if not ops:
        raise ExportError(f"{name}: a {_spec(module).weight} {_spec(module).scheme} Linear "
                          f"({_spec(module).granularity}) has no ONNX Runtime kernel that keeps its numerics")
    chosen = op or ops[0]
    if chosen not in ops:
        raise ExportError(f"{name}: {chosen} cannot run this Linear (it can run {', '.join(ops)})")
    return LINEAR_OPS.get(chosen)(graph, module, x, accuracy_level)


def _bias(graph: Graph, module: nn.Module) -> str:
    if getattr(module, "bias", None) is None:
        return ""
    return graph.joined("bias", [part.bias.detach().float().numpy() for part in parts(module)])


def _whole_group_block(module: nn.Module) -> int | None:
    """The MatMulNBits block of a grouped module's weights: its group, where that is a block size."""
    group = int(_spec(module).granularity.split(":")[1])
    return group if group in GROUP_BLOCKS else None


def _int8_block(width: int, max_block: int | None = None) -> int | None:
    return next((block for block in BLOCKS if width % block == 0 and block <= (max_block or block)), None)


def _pack_nibbles(values: np.ndarray) -> np.ndarray:
    """Unsigned 4-bit values, two per byte along the last axis (low nibble first), padded even."""
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros((*values.shape[:-1], 1), values.dtype)], axis=-1)
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


NbitsWeights = tuple[np.ndarray, np.ndarray, np.ndarray, int, int]


def nbits_weights(module: nn.Module, max_block: int | None = None) -> NbitsWeights:
    """(codes, scales, zero points, bits, block size) of a QLinear or QEmbedding as MatMulNBits
    and GatherBlockQuantized store them (but int8 codes signed, as lowbit stores them: see
    `stored_codes`): codes (rows, blocks, block bytes), one float32 scale
    and one zero point per block of each row. With `max_block`, blocks are at most that long: an
    int4 group splits into blocks that repeat its scale and zero point (the same weights; at
    accuracy level 4, MatMulNBits quantizes activations per block, so smaller is more exact)."""
    spec, rows = _spec(module), module.weight.shape[0]
    width = module.weight_shape[-1]
    if spec.weight in ("int4", "int5"):
        group = int(spec.granularity.split(":")[1])
        block = _group_block(group, max_block)
        repeat, blocks = group // block, width // block
        scales = np.repeat(module.weight_scale.float().numpy().reshape(rows, -1), repeat, axis=1)
        floats = spec.zero_point != "int"  # HQQ's, or a minimum's: float32, one per block, not packed
        zero_points = _zero_points(module)
        zero_points = np.repeat((zero_points if floats else zero_points.astype(np.uint8)).reshape(rows, -1),
                                repeat, axis=1)
        if spec.weight == "int4":  # packed two per byte, as MatMulNBits' 4-bit blocks are
            codes = module.weight.numpy().reshape(rows, blocks, block // 2)
            return codes, scales, zero_points if floats else _pack_nibbles(zero_points), 4, block
        # int5: 0..31 one per byte, an 8-bit block with the group's zero point: the same values
        return module.weight.numpy().reshape(rows, blocks, block), scales, zero_points, 8, block
    grouped = spec.granularity.startswith("group:")
    block = _group_block(int(spec.granularity[6:]), max_block) if grouped else _int8_block(width, max_block)
    if spec.weight != "int8" or not spec.symmetric or block not in GROUP_BLOCKS:
        raise ExportError(f"{spec.weight} {spec.granularity} weights of width {width} have no block layout")
    blocks = width // block
    codes = module.weight.numpy().reshape(rows, blocks, block)  # int8: `Graph.unsigned` makes them uint8
    scale = module.weight_scale.float().numpy()
    if grouped:  # one scale per group of each row, repeated over the blocks a group splits into
        scales = np.repeat(scale.reshape(rows, -1), blocks // scale.reshape(rows, -1).shape[1], axis=1)
    else:
        scales = np.repeat(np.broadcast_to(scale.reshape(-1), (rows,)).reshape(rows, 1), blocks, axis=1)
    return codes, scales, np.full((rows, blocks), 128, np.uint8), 8, block


def _group_block(group: int, max_block: int | None) -> int:
    """The MatMulNBits block for weights grouped by `group`: the group, or `max_block` where that
    divides it (the group's scale then repeats over its blocks)."""
    return max_block if max_block and group > max_block and group % max_block == 0 else group


def parts(module: nn.Module) -> list[nn.Module]:
    """The Linears a stacked module was made of (`stacked`), or the module itself."""
    return getattr(module, "stacked_parts", None) or [module]


def stored_codes(graph: Graph, codes: list[np.ndarray]) -> str:
    """Block codes (the parts of a stacked module) as MatMulNBits and GatherBlockQuantized take
    them: uint8, signed int8 codes shifted by 128 by a node on lowbit's own bytes."""
    joined = graph.joined("weight", codes)
    return graph.unsigned(joined) if codes[0].dtype == np.int8 else joined


@LINEAR_OPS.register("matmul_nbits")
def matmul_nbits(graph: Graph, module: nn.Module, x: str, accuracy_level: int) -> str:
    weights = [nbits_weights(part, graph.max_block) for part in parts(module)]
    _, _, zero_points, bits, block = weights[0]
    fractions = None
    if zero_points.dtype != np.uint8:  # float zero points (HQQ's): see `_float_zero_points`
        weights, fractions = _float_zero_points(weights)
    inputs = [x, stored_codes(graph, [codes for codes, *_ in weights]),
              graph.joined("scales", [scales.reshape(-1) for _, scales, *_ in weights]),
              graph.joined("zero_points", [zero_points.reshape(-1) for _, _, zero_points, *_ in weights]),
              "", _bias(graph, module)]
    product = graph.node("MatMulNBits", inputs if inputs[-1] else inputs[:4], domain=MICROSOFT,
                         K=module.in_features, N=module.out_features, bits=bits, block_size=block,
                         accuracy_level=accuracy_level)
    if fractions is None:
        return product
    sums = graph.node("MatMul", [x, graph.constant("block_sums", _block_sums(module.in_features, block))])
    correction = graph.node("MatMul", [sums, graph.constant("zero_fractions", fractions)])
    return graph.node("Sub", [product, correction])


def _zero_points(module: nn.Module) -> np.ndarray:
    """A module's zero points; for a grid with a minimum m, the float zero point −m / scale that
    gives the same levels ((q − z)·s = q·s + m, up to float32 rounding)."""
    minimum = getattr(module, "weight_minimum", None)
    if minimum is None:
        return module.weight_zero_point.numpy()
    return (-minimum.double() / module.weight_scale.double()).float().numpy()


def _float_zero_points(weights: list[NbitsWeights]) -> tuple[list[NbitsWeights], np.ndarray]:
    """MatMulNBits with float zero points dequantizes every call (20× slower here), so a float zero
    point z splits into its nearest grid level n, which the kernel takes, and the rest: (q − z)·s =
    (q − n)·s − (z − n)·s. The rest is one value per block of each output; the graph subtracts
    x's block sums times it (two small matmuls). Returns the weights with packed integer zero
    points, and the rests as a (blocks, outputs) matrix."""
    split, fractions = [], []
    for codes, scales, zero_points, bits, block in weights:
        nearest = np.clip(np.rint(zero_points), 0, 15)
        split.append((codes, scales, _pack_nibbles(nearest.astype(np.uint8)), bits, block))
        fractions.append(((zero_points - nearest) * scales).astype(np.float32))
    return split, np.concatenate(fractions, axis=0).T.copy()


def _block_sums(width: int, block: int) -> np.ndarray:
    """(width, blocks) of ones where input k lies in block b: x @ it sums x over each block."""
    return np.kron(np.eye(width // block, dtype=np.float32), np.ones((block, 1), np.float32))


def _channel_scales(module: nn.Module) -> np.ndarray:
    """One float32 scale per output of an int8 per-channel (or per-tensor) Linear."""
    scale = module.weight_scale.float().numpy().reshape(-1)
    return np.ascontiguousarray(np.broadcast_to(scale, (module.out_features,)), dtype=np.float32)


def _int8_weight(graph: Graph, module: nn.Module) -> str:
    """The (in, out) int8 matrix DynamicQuantizeMatMul and QAttention take, from lowbit's (out, in)."""
    return graph.transposed(graph.joined("weight", [part.weight.numpy() for part in parts(module)]))


@LINEAR_OPS.register("dynamic_quantize_matmul")
def dynamic_quantize_matmul(graph: Graph, module: nn.Module, x: str, _: int) -> str:
    scales = graph.joined("scale", [_channel_scales(part) for part in parts(module)])
    inputs = [x, _int8_weight(graph, module), scales,
              graph.constant("zero_point", np.zeros(module.out_features, np.int8)), _bias(graph, module)]
    return graph.node("DynamicQuantizeMatMul", inputs if inputs[-1] else inputs[:4], domain=MICROSOFT)


@LINEAR_OPS.register("float")
def float_matmul(graph: Graph, module: nn.Module, x: str, _: int) -> str:
    def matrix(part: nn.Module) -> np.ndarray:
        weight = part.dequantized_weight() if hasattr(part, "dequantized_weight") else part.weight
        return weight.detach().float().numpy()
    weight = graph.transposed(graph.joined("weight", [matrix(part) for part in parts(module)]))
    product = graph.node("MatMul", [x, weight])
    bias = _bias(graph, module)
    return graph.node("Add", [product, bias]) if bias else product


def emit_quantized_attention(graph: Graph, module: nn.Module, x: str, mask: str, heads: int) -> str:
    """Multi-head attention of `x` through `module`, the stacked query/key/value projection of a
    `w8a8-dynamic` model, as ONNX Runtime's QAttention: `x` quantized to uint8 per tensor at run
    time (DynamicQuantizeLinear, what DynamicQuantizeMatMul does inside), the int8 weights,
    attention over the 2-D padding `mask`. Its output equals DynamicQuantizeMatMul + Split +
    MultiHeadAttention bit for bit, in two nodes instead of three (MiniLM, one 20-token sentence:
    90 against 130 µs per layer here)."""
    quantized, scale, zero_point = graph.node("DynamicQuantizeLinear", [x], outputs=3)
    rows = module.out_features
    bias = _bias(graph, module) or graph.constant("bias", np.zeros(rows, np.float32))
    inputs = [quantized, _int8_weight(graph, module), bias, scale,
              graph.joined("scale", [_channel_scales(part) for part in parts(module)]), mask, zero_point,
              graph.constant("zero_point", np.zeros(rows, np.int8))]
    return graph.node("QAttention", inputs, domain=MICROSOFT, num_heads=heads)


def emit_embedding(graph: Graph, module: nn.Module, indices: str, name: str) -> str:
    """Rows of `module` (a QEmbedding or a float Embedding) at `indices`: int4 and int8 tables
    stay quantized (GatherBlockQuantized); what has no block layout is dequantized once."""
    spec = _spec(module)
    if spec is not None and spec.weight in ("int4", "int5", "int8"):
        try:
            codes, scales, zero_points, bits, block = nbits_weights(module)
        except ExportError:
            codes = None
        if codes is not None and zero_points.dtype == np.uint8:  # (its zero points are the codes' type)
            rows = module.num_embeddings
            return graph.node("GatherBlockQuantized", [
                stored_codes(graph, [codes.reshape(rows, -1)]), indices,
                graph.constant("table_scales", scales.astype(np.float32)),
                graph.constant("table_zero_points", zero_points.reshape(rows, -1))],
                domain=MICROSOFT, bits=bits, block_size=block, gather_axis=0, quantize_axis=1)
    table = module.dequantized_weight() if hasattr(module, "dequantized_weight") else module.weight
    return graph.node("Gather", [graph.constant("table", table.detach().float().numpy()), indices])


def stacked(modules: list[nn.Module]) -> nn.Module:
    """One Linear computing `modules` side by side (their outputs concatenated), their stored
    tensors stacked along the output dimension: the same integers, scales and zero points."""
    first = modules[0]
    total = sum(module.out_features for module in modules)
    if isinstance(first, QLinear):
        spec = first.spec.with_kernels({})
        if spec.scheme == "static" or any(module.spec.with_kernels({}) != spec for module in modules):
            raise ExportError("Linears stacked into one matmul are quantized differently, or statically")
        joined: nn.Module = QLinear(first.in_features, total, first.bias is not None, first.spec)
    else:
        joined = nn.Linear(first.in_features, total, bias=first.bias is not None)
    with torch.no_grad():
        for name, tensor in joined.state_dict().items():
            tensor.copy_(torch.cat([module.state_dict()[name] for module in modules]))
    joined.stacked_parts = list(modules)  # the graph stores each part's own tensors (`parts`)
    return joined


@dataclass
class GraphBuild:
    """A model's graph being built: the op choice per Linear name and the accuracy level every
    MatMulNBits takes (what lowbit.runtimes.onnx_bert and onnx_llama share)."""

    graph: Graph
    ops: dict[str, str]
    accuracy_level: int

    def linear(self, module: nn.Module, x: str, name: str) -> str:
        return emit_linear(self.graph, module, x, name, self.ops.get(name), self.accuracy_level)

    def op_for(self, module: nn.Module, name: str) -> str | None:
        """The linear op `linear` would use for `module` (None when none can run it)."""
        ops = linear_ops_for(module)
        return self.ops.get(name) or (ops[0] if ops else None)

    def integers(self, hint: str, *values: int) -> str:
        """An int64 constant: a scalar for one value, else a vector."""
        return self.graph.constant(hint, np.array(values if len(values) > 1 else values[0], np.int64))
