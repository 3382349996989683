"""Plain PyTorch models (convolutional nets such as EfficientNet) as one ONNX graph in QDQ form, on
ONNX Runtime's int8 convolutions, with lowbit's integers, scales and zero points unchanged.

torch's own exporter (torch.onnx, dynamo) writes the float graph, from a copy of the model whose
quantized modules compute in float on lowbit's dequantized weights. Then each quantized module's
node gets lowbit's values back:

- its weight as DequantizeLinear of the stored int8 values. On an x86 CPU without VNNI, uint8 ×
  int8 products saturate int16 pair sums, so `lowbit.load` shifts them to uint8 with zero point
  128 there (`for_this_cpu`: the same numbers, about half the speed);
- for the static scheme, its bias in int32 on the scale of input × weight (as QLinearConv takes
  it) and a QuantizeLinear/DequantizeLinear pair on its input and on its output, each with the
  module's own calibrated grid. ONNX Runtime fuses DequantizeLinear → Conv → QuantizeLinear into
  QLinearConv.

The rounding points of lowbit.nn.rounding (a residual sum rounded where a convolution reads it)
come out of the exporter as QuantizeLinear/DequantizeLinear already; ONNX Runtime fuses
DequantizeLinear, DequantizeLinear → Add → QuantizeLinear into QLinearAdd when their scales are
0-d, as every constant here is.

One tensor gets one grid: a module reading a tensor already on its input grid (a quantized
module's output, lowbit.transform.fold, or a rounding point) reads that DequantizeLinear directly,
and a Clip fused into a grid that lies inside its interval is left out (it would change nothing).
A Linear the exporter does not write as a Gemm on its own weight (a 3-D input becomes Transpose
and MatMul) is refused with its name.
"""

from __future__ import annotations

import copy
import io
import logging
import warnings
from collections import defaultdict
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.core.cpu import has_vnni
from lowbit.nn.qconv import QConv2d
from lowbit.nn.qlinear import QLinear
from lowbit.runtimes.onnx_modules import ExportError
from lowbit.transform.quantize import quantized_modules, set_module

INPUT, OUTPUT = "input", "output"
WEIGHT_NODES = {QConv2d: "Conv", QLinear: "Gemm"}


class _FloatConv(nn.Module):
    """A QConv2d computing in float on its dequantized weight (what torch's exporter traces)."""

    def __init__(self, module: QConv2d) -> None:
        super().__init__()
        self.static_padding = module.static_padding
        self.weight = nn.Parameter(module.dequantized_weight(torch.float32))
        self.bias = None if module.bias is None else nn.Parameter(module.bias.float().clone())
        self.options = (module.stride, module.padding, module.dilation, module.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x if self.static_padding is None else self.static_padding(x)
        return F.conv2d(x, self.weight, self.bias, *self.options)


class _FloatLinear(nn.Module):
    def __init__(self, module: QLinear) -> None:
        super().__init__()
        self.weight = nn.Parameter(module.dequantized_weight(torch.float32))
        self.bias = None if module.bias is None else nn.Parameter(module.bias.float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def _check_exportable(name: str, module: nn.Module) -> None:
    spec = module.spec
    if type(module) not in WEIGHT_NODES:
        raise ExportError(f"{name!r}: a {type(module).__name__} has no ONNX form in a plain torch model here")
    exact = spec.weight in ("fp16", "bf16") or (spec.weight == "int8" and spec.scheme != "dynamic"
                                                  and not spec.granularity.startswith("group:"))
    if not exact:
        raise ExportError(f"{name!r}: a {type(module).__name__} with {spec.weight} {spec.granularity} "
                          f"weights in the {spec.scheme} scheme has no ONNX Runtime kernel that keeps "
                          "lowbit's numerics in a plain torch model")


def _float_copy(model: nn.Module) -> tuple[nn.Module, dict[str, nn.Module]]:
    """A copy of `model` computing in float, and its quantized modules by name."""
    quantized = quantized_modules(model)
    for name, module in quantized.items():
        _check_exportable(name, module)
    shadow = copy.deepcopy(model)
    for name, module in quantized.items():
        set_module(shadow, name, _FloatConv(module) if isinstance(module, QConv2d) else _FloatLinear(module))
    shadow.requires_grad_(False)  # rounding points (lowbit.nn.rounding) export as QDQ only without grad
    return shadow.eval(), quantized


def _example(model: nn.Module) -> torch.Tensor:
    example = getattr(model, "lowbit_example_input", None)
    if not isinstance(example, torch.Tensor):
        raise ExportError(f"exporting a plain {type(model).__name__} needs an example input: quantize it "
                          "with calibration batches (tensors), or set model.lowbit_example_input = one batch")
    return example


def _float_graph(shadow: nn.Module, example: torch.Tensor) -> Any:
    """torch's dynamo export of `shadow`, the batch dimension dynamic."""
    import onnx

    buffer = io.BytesIO()
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)  # it lists every torchvision op it skips, at each export
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(shadow, (example,), input_names=[INPUT], output_names=[OUTPUT],
                                        dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True,
                                        verbose=False)
            program.save(buffer)
    except Exception as error:  # noqa: BLE001 - torch.export raises many untyped errors
        first_line = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        raise ExportError(f"torch's ONNX exporter cannot trace {type(shadow).__name__}: {first_line}") \
            from None
    finally:
        exporter_log.setLevel(level)
    return onnx.load_model_from_string(buffer.getvalue())


def _fit_bias(codes: np.ndarray, scales: np.ndarray, bias: np.ndarray,
              input_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """(codes, scales) under which each channel's bias fits int32 at input × weight scale.

    A channel misses only when batch norm folded a near-zero gain into it: weights of order 1e-9
    beside a bias of order 1. Its weights are then set to zero and its scale to hold the bias to
    2^-24; what the weights contributed (at most 127 × scale × the input's absolute sum, about
    1e-7 of an output step on EfficientNet-Lite0) is what changes."""
    overflow = np.abs(bias.astype(np.float64)) / (input_scale * scales.astype(np.float64)) > 2**31 - 1
    codes, scales = codes.copy(), scales.copy()
    codes[overflow] = 0
    scales[overflow] = np.maximum(np.abs(bias[overflow]) / (input_scale * 2.0**24),
                                  np.finfo(np.float32).tiny / input_scale)
    return codes, scales


class _Rewrite:
    """The float graph's nodes, rewritten in order with lowbit's integers (see the module doc)."""

    def __init__(self, graph: Any, quantized: dict[str, nn.Module]) -> None:
        self.graph, self.quantized = graph, quantized
        self.initializers = {tensor.name: tensor for tensor in graph.initializer}
        self.readers: dict[str, list[Any]] = defaultdict(list)
        for node in graph.node:
            for name in node.input:
                self.readers[name].append(node)
        self.nodes: list[Any] = []
        self.added: list[Any] = []
        self.grids: dict[str, tuple[float, int]] = {}  # tensor -> the grid it was rounded on
        self.renamed: dict[str, str] = {}  # tensor -> what to read instead
        self.pending: dict[str, tuple[float, int]] = {}  # tensor -> round it on this grid once made
        self.dropped: set[str] = set()
        self.count = 0

    def fresh(self, hint: str) -> str:
        self.count += 1
        return f"lowbit_{hint}_{self.count}"

    def constant(self, hint: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self.fresh(hint)  # np.array keeps a scalar 0-d: ONNX Runtime fuses QLinearAdd only on those
        self.added.append(numpy_helper.from_array(np.array(array, order="C"), name))
        return name

    def emit(self, op: str, inputs: list[str], **attributes: Any) -> str:
        from onnx import helper

        output = self.fresh(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [output], name=self.fresh(op), **attributes))
        return output

    def round_trip(self, tensor: str, scale: float, zero_point: int) -> str:
        """Quantize then dequantize `tensor` on an unsigned 8-bit grid; the dequantized name."""
        grid = [self.constant("scale", np.array(scale, np.float32)),
                self.constant("zero_point", np.array(zero_point, np.uint8))]
        rounded = self.emit("DequantizeLinear", [self.emit("QuantizeLinear", [tensor, *grid]), *grid])
        self.grids[rounded] = (scale, zero_point)
        return rounded

    def take_initializer(self, name: str) -> np.ndarray:
        from onnx import numpy_helper

        tensor = self.initializers.pop(name, None)
        if tensor is None:
            raise ExportError(f"torch's exporter did not keep {name!r} as a stored tensor; lowbit cannot "
                              "place its integers")
        self.graph.initializer.remove(tensor)
        return numpy_helper.to_array(tensor)

    def module_of(self, node: Any) -> tuple[str, nn.Module] | None:
        if len(node.input) < 2 or not node.input[1].endswith(".weight"):
            return None
        name = node.input[1][: -len(".weight")]
        module = self.quantized.get(name)
        return (name, module) if module is not None and node.op_type == WEIGHT_NODES[type(module)] else None

    def weight(self, node: Any, module: nn.Module) -> np.ndarray | None:
        """Node input 1 as DequantizeLinear of lowbit's integers; the per-channel scales (None for
        16-bit weights, which stay float)."""
        if module.spec.weight in ("fp16", "bf16"):
            return None
        self.take_initializer(node.input[1])
        codes = module.weight.numpy()
        scales = np.broadcast_to(module.weight_scale.float().numpy().reshape(-1), (codes.shape[0],)).copy()
        if module.spec.scheme == "static" and module.bias is not None:
            codes, scales = _fit_bias(codes, scales, module.bias.float().numpy(), float(module.input_scale))
        node.input[1] = self.emit("DequantizeLinear", [
            self.constant("weight", codes), self.constant("weight_scale", scales.astype(np.float32)),
            self.constant("weight_zero_point", np.zeros(codes.shape[0], np.int8))], axis=0)
        return scales

    def static(self, node: Any, module: nn.Module, scales: np.ndarray, outputs: set[str]) -> None:
        """Input and output grids of a static module, and its bias in int32."""
        input_grid = (float(module.input_scale), int(module.input_zero_point))
        if self.grids.get(node.input[0]) != input_grid:
            node.input[0] = self.round_trip(node.input[0], *input_grid)
        if len(node.input) > 2 and node.input[2]:
            bias_scales = np.maximum(input_grid[0] * scales, np.finfo(np.float32).tiny).astype(np.float32)
            bias = np.clip(np.round(self.take_initializer(node.input[2]).astype(np.float64) / bias_scales),
                           -2**31, 2**31 - 1)
            node.input[2] = self.emit("DequantizeLinear", [
                self.constant("bias", bias.astype(np.int32)), self.constant("bias_scale", bias_scales),
                self.constant("bias_zero_point", np.zeros(len(bias), np.int32))], axis=0)
        if module.spec.output == "float":
            return
        output_grid = (float(module.output_scale), int(module.output_zero_point))
        self.pending[node.output[0]] = output_grid
        readers = self.readers[node.output[0]]
        if (len(readers) == 1 and readers[0].op_type == "Clip" and readers[0].output[0] not in outputs
                and self._inside(readers[0], output_grid)):
            self.dropped.add(readers[0].name)
            self.renamed[readers[0].output[0]] = node.output[0]

    def _inside(self, clip: Any, grid: tuple[float, int]) -> bool:
        """Whether every value of `grid` lies within `clip`'s interval (constant bounds only)."""
        from onnx import numpy_helper

        bounds = []
        for name in list(clip.input[1:3]) + [""] * (3 - len(clip.input)):
            tensor = self.initializers.get(name)
            if name and tensor is None:
                return False
            bounds.append(None if not name else float(numpy_helper.to_array(tensor)))
        scale, zero_point = grid
        low, high = -zero_point * scale, (255 - zero_point) * scale
        below = bounds[0] is None or bounds[0] <= low
        return below and (bounds[1] is None or high <= bounds[1] * (1 + 1e-6))

    def note_grid(self, node: Any) -> None:
        """Remember the grid of a DequantizeLinear the exporter wrote (a rounding point,
        lowbit.nn.rounding), so a convolution reading it on the same grid is not rounded twice."""
        from onnx import numpy_helper

        if node.op_type != "DequantizeLinear" or len(node.input) != 3:
            return
        scale, zero_point = (self.initializers.get(name) for name in node.input[1:])
        if scale is not None and zero_point is not None and not scale.dims and not zero_point.dims:
            self.grids[node.output[0]] = (float(numpy_helper.to_array(scale)),
                                          int(numpy_helper.to_array(zero_point)))

    def resolve(self, name: str) -> str:
        while name in self.renamed:
            name = self.renamed[name]
        return name

    def run(self) -> None:
        outputs = {value.name for value in self.graph.output}
        placed = set()
        for node in self.graph.node:
            if node.name in self.dropped:
                continue
            for index, name in enumerate(node.input):
                node.input[index] = self.resolve(name)
            self.note_grid(node)
            found = self.module_of(node)
            if found is not None:
                placed.add(found[0])
                scales = self.weight(node, found[1])
                if found[1].spec.scheme == "static":
                    self.static(node, found[1], scales, outputs)
            self.nodes.append(node)
            for index, output in enumerate(node.output):
                if output in self.pending:
                    self.round_output(node, index, self.pending.pop(output), outputs)
        missing = sorted(set(self.quantized) - placed)
        if missing:
            raise ExportError(f"torch's exporter merged or renamed {missing[0]!r}; lowbit cannot place its "
                              "integers")
        del self.graph.node[:]
        self.graph.node.extend(self.nodes)
        self.graph.initializer.extend(self.added)

    def round_output(self, node: Any, index: int, grid: tuple[float, int], outputs: set[str]) -> None:
        """Round a static module's output on its grid; readers read the rounded tensor (a graph
        output keeps its name: the node that made it writes a private one)."""
        output = node.output[index]
        if output not in outputs:
            self.renamed[output] = self.round_trip(output, *grid)
            return
        node.output[index] = self.fresh("raw")
        rounded = self.round_trip(node.output[index], *grid)
        self.nodes[-1].output[0] = output
        self.grids[output] = self.grids.pop(rounded)


def build_torch(model: nn.Module, ops: dict[str, str] | None = None, accuracy_level: int = 0,
                max_block: int | None = None) -> Any:
    """The ONNX model of a quantized plain PyTorch model: input `input`, output `output`, the batch
    dimension dynamic. `ops`, `accuracy_level` and `max_block` (for the transformer builders' MatMulNBits)
    do not apply."""
    import onnx

    shadow, quantized = _float_copy(model)
    exported = _float_graph(shadow, _example(model))
    _Rewrite(exported.graph, quantized).run()
    exported.producer_name = "lowbit"
    try:
        onnx.checker.check_model(exported)
    except onnx.checker.ValidationError as error:
        raise ExportError(f"the rewritten graph does not check: {str(error)[:200]}") from None
    return exported


def for_this_cpu(data: bytes) -> bytes:
    """The graph with its int8 DequantizeLinear weights as uint8 (+128, zero point 128) when this
    CPU could saturate on them; unchanged otherwise, and for graphs that hold none."""
    if has_vnni():
        return data
    import onnx
    from onnx import numpy_helper

    model = onnx.load_model_from_string(data)
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    changed = False
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or len(node.input) < 3:
            continue
        codes, zero_points = initializers.get(node.input[0]), initializers.get(node.input[2])
        if (codes is None or zero_points is None or codes.data_type != onnx.TensorProto.INT8
                or len(codes.dims) < 2):
            continue
        shifted = (numpy_helper.to_array(codes).astype(np.int16) + 128).astype(np.uint8)
        zeros = (numpy_helper.to_array(zero_points).astype(np.int16) + 128).astype(np.uint8)
        codes.CopyFrom(numpy_helper.from_array(shifted, codes.name))
        zero_points.CopyFrom(numpy_helper.from_array(zeros, zero_points.name))
        changed = True
    return model.SerializeToString() if changed else data
