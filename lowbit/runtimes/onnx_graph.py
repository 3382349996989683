"""A small builder for ONNX graphs: named constants, nodes and typed inputs and outputs.

The graph builders of lowbit.runtimes (one file per model family) describe a model with it, op
by op, on ONNX Runtime's fused CPU kernels (the `com.microsoft` domain); `model()` gives the
checked ONNX model.
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
