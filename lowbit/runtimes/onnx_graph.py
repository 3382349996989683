"""A small builder for ONNX graphs: named constants, nodes and typed inputs and outputs.

The graph builders of lowbit.runtimes (one file per model family) describe a model with it, op
by op, on ONNX Runtime's fused CPU kernels (the `com.microsoft` domain); `model()` gives the
checked ONNX model.

A stored tensor goes into the graph with the bytes lowbit's tensor file holds, so that a folder
can keep it once (lowbit.runtimes.onnx_shared): where a kernel wants another layout, small nodes
(`joined`, `transposed`, `unsigned`) make it from those bytes, and ONNX Runtime folds them into
one tensor when it opens the session. `fold_constants` does the same for code that reads the
graph's weights (lowbit.runtimes.onnx_large_inputs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

ONNX_OPSET = 23  # RMSNormalization (Llama) is opset 23
MICROSOFT = "com.microsoft"


@dataclass
class Graph:
    """An ONNX graph under construction. Names are made unique by a running count."""

    name: str
    nodes: list[Any] = field(default_factory=list)
    initializers: list[Any] = field(default_factory=list)
    inputs: list[Any] = field(default_factory=list)
    outputs: list[Any] = field(default_factory=list)
    count: int = 0
    max_block: int | None = None  # MatMulNBits blocks at most this long (the activation block at level 4)

    def fresh(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def constant(self, hint: str, array: np.ndarray) -> str:
        """A stored tensor (an initializer); its name."""
        from onnx import numpy_helper

        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def joined(self, hint: str, arrays: list[np.ndarray]) -> str:
        """One tensor: `arrays` concatenated along their first axis (a Concat node over one constant
        each, where there are several: the rows of Linears stacked into one matmul)."""
        names = [self.constant(hint, array) for array in arrays]
        return names[0] if len(names) == 1 else self.node("Concat", names, hint, axis=0)

    def transposed(self, value: str) -> str:
        """The matrix `value` transposed (a Linear's (out, in) weight as the (in, out) a MatMul takes)."""
        return self.node("Transpose", [value], "transposed", perm=[1, 0])

    def unsigned(self, value: str) -> str:
        """int8 codes `value` as uint8 codes with zero point 128 (each +128: the sign bit flipped)."""
        as_bytes = self.node("Cast", [value], "as_uint8", to=2)  # TensorProto.UINT8; modular, as C's cast
        return self.node("BitwiseXor", [as_bytes, self.constant("sign_bit", np.array(0x80, np.uint8))])

    def node(self, op: str, inputs: list[str], hint: str | None = None, outputs: int = 1,
             domain: str = "", **attributes: Any) -> Any:
        """Add one node; its output name (a list of names when `outputs` > 1). An empty input name
        leaves an optional input out."""
        from onnx import helper

        names = [self.fresh(hint or op.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, names, name=self.fresh(op), domain=domain or None,
                                           **attributes))
        return names if outputs > 1 else names[0]

    def add_input(self, name: str, element_type: int, shape: list[Any]) -> str:
        from onnx import helper

        self.inputs.append(helper.make_tensor_value_info(name, element_type, shape))
        return name

    def add_output(self, value: str, name: str, element_type: int, shape: list[Any]) -> None:
        """Expose `value` as the graph output `name`."""
        from onnx import helper

        self.nodes.append(helper.make_node("Identity", [value], [name], name=self.fresh("output")))
        self.outputs.append(helper.make_tensor_value_info(name, element_type, shape))

    def model(self, producer: str) -> Any:
        """The finished ONNX model, checked by onnx's own checker."""
        import onnx
        from onnx import helper

        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers)
        model = helper.make_model(graph, producer_name=producer, opset_imports=[
            helper.make_opsetid("", ONNX_OPSET), helper.make_opsetid(MICROSOFT, 1)])
        model.ir_version = min(model.ir_version, 10)
        onnx.checker.check_model(model)
        return model


FOLDED_OPS = {"Concat", "Transpose", "Cast", "BitwiseXor", "Reshape"}  # what `Graph` adds before a kernel


def fold_constants(model: Any) -> Any:
    """`model` (a ModelProto, changed in place and returned) with every node of FOLDED_OPS whose
    inputs are all stored tensors replaced by the tensor it computes, as ONNX Runtime's optimizer
    does when it opens a session."""
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    stored = {tensor.name: tensor for tensor in graph.initializer}
    kept = []
    for node in graph.node:
        if node.op_type not in FOLDED_OPS or not all(name in stored for name in node.input):
            kept.append(node)
            continue
        feeds = {name: numpy_helper.to_array(stored[name]) for name in node.input}
        for name, value in zip(node.output, ReferenceEvaluator(node).run(None, feeds), strict=True):
            stored[name] = numpy_helper.from_array(np.asarray(value), name)
    used = {name for node in kept for name in node.input} | {value.name for value in graph.output}
    del graph.node[:], graph.initializer[:]
    graph.node.extend(kept)
    graph.initializer.extend(tensor for name, tensor in stored.items() if name in used)
    return model
