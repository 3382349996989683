"""BERT-family encoders (BERT, MiniLM) as one ONNX graph on ONNX Runtime's fused CPU kernels.

Per layer: one quantized matmul for query, key and value together (lowbit quantizes each output
row on its own, so stacking the three weights keeps every integer and scale), fused multi-head
attention over the padding mask (for `w8a8-dynamic`, matmul and attention are one QAttention),
the output projection, the residual sum and layer norm, the feed-forward matmuls with GELU
between them, and the residual sum and layer norm again. The sum and the norm stay two nodes:
ONNX Runtime 1.32's fused SkipLayerNormalization kernel measured 5.7 to 6.6× slower than Add +
LayerNormalization here (52.7 against 9.2 µs at 20 × 384, 2.1 against 0.32 ms at 1024 × 384), so
lowbit's sessions also turn off the optimizer pass that would fuse them again
(lowbit.runtimes.onnx_session). Embeddings gather quantized rows. Outputs: `last_hidden_state`,
and `pooler_output` when the model has a pooler, as transformers' BertModel gives them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import nn

from lowbit.runtimes.onnx_graph import MICROSOFT, Graph
from lowbit.runtimes.onnx_modules import (
    ExportError,
    GraphBuild,
    emit_embedding,
    emit_quantized_attention,
    linear_ops_for,
    stacked,
)

GELUS = {"gelu": "Gelu", "gelu_new": "FastGelu", "gelu_pytorch_tanh": "FastGelu"}
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class _Encoder(GraphBuild):
    """A BERT encoder's graph being built, block by block."""

    def norm(self, x: str, norm: nn.LayerNorm, residual: str | None = None) -> str:
        """LayerNormalization of `x` (plus `residual`, added first as transformers adds it) with
        `norm`'s weights and epsilon."""
        weights = [self.graph.constant(hint, tensor.detach().float().numpy())
                   for hint, tensor in (("gamma", norm.weight), ("beta", norm.bias))]
        total = x if residual is None else self.graph.node("Add", [x, residual])
        return self.graph.node("LayerNormalization", [total, *weights], epsilon=norm.eps, axis=-1)

    def embeddings(self, embeddings: nn.Module, ids: str, token_types: str) -> str:
        from onnx import numpy_helper

        graph = self.graph
        ones = graph.node("ConstantOfShape", [graph.node("Shape", [ids])],
                          value=numpy_helper.from_array(np.array([1], np.int64)))
        positions = graph.node("Sub", [graph.node("CumSum", [ones, self.integers("axis", 1)]),
                                       self.integers("one", 1)])  # 0, 1, 2, ... in every row
        rows = [emit_embedding(graph, getattr(embeddings, name), indices, f"embeddings.{name}")
                for name, indices in (("word_embeddings", ids), ("token_type_embeddings", token_types),
                                      ("position_embeddings", positions))]
        total = graph.node("Add", [graph.node("Add", rows[:2]), rows[2]])  # transformers' order of sums
        return self.norm(total, embeddings.LayerNorm)

    def attention(self, attention: nn.Module, hidden: str, mask: str, heads: int, name: str) -> str:
        """Self-attention's context: QAttention for int8 dynamic projections, else one matmul for
        query, key and value together, split, and MultiHeadAttention."""
        graph, qkv_name = self.graph, f"{name}.attention.self.qkv"
        projection = stacked([attention.query, attention.key, attention.value])
        if self.op_for(projection, qkv_name) == "dynamic_quantize_matmul":
            return emit_quantized_attention(graph, projection, hidden, mask, heads)
        qkv = self.linear(projection, hidden, qkv_name)
        widths = self.integers("split", *[attention.query.out_features] * 3)
        query, key, value = graph.node("Split", [qkv, widths], outputs=3, axis=-1)
        return graph.node("MultiHeadAttention", [query, key, value, "", mask], domain=MICROSOFT,
                          num_heads=heads)

    def layer(self, layer: nn.Module, hidden: str, mask: str, heads: int, gelu: str, name: str) -> str:
        graph = self.graph
        context = self.attention(layer.attention.self, hidden, mask, heads, name)
        projected = self.linear(layer.attention.output.dense, context, f"{name}.attention.output.dense")
        attended = self.norm(projected, layer.attention.output.LayerNorm, residual=hidden)
        inner = self.linear(layer.intermediate.dense, attended, f"{name}.intermediate.dense")
        activated = graph.node(gelu, [inner], domain=MICROSOFT)
        outer = self.linear(layer.output.dense, activated, f"{name}.output.dense")
        return self.norm(outer, layer.output.LayerNorm, residual=attended)

    def pooler(self, pooler: nn.Module, hidden: str) -> str:
        """tanh(dense(first token)), as BertPooler computes it."""
        graph = self.graph
        first = graph.node("Slice", [hidden, self.integers("start", 0), self.integers("end", 1),
                                     self.integers("axis", 1)])
        token = graph.node("Squeeze", [first, self.integers("axis", 1)])
        return graph.node("Tanh", [self.linear(pooler.dense, token, "pooler.dense")])


def fused_ops(model: nn.Module) -> dict[str, str]:
    """The ONNX op of each Linear that `build_bert` fuses beyond `op_name`'s default: query, key
    and value of `w8a8-dynamic` layers run in QAttention."""
    fused = {}
    for index, layer in enumerate(model.encoder.layer):
        attention = layer.attention.self
        projections = [attention.query, attention.key, attention.value]
        try:
            ops = linear_ops_for(stacked(projections))
        except ExportError:  # quantized differently: each runs its own op
            continue
        if ops[:1] == ["dynamic_quantize_matmul"]:
            prefix = f"encoder.layer.{index}.attention.self"
            fused.update({f"{prefix}.{part}": "QAttention" for part in ("query", "key", "value")})
    return fused


def build_bert(model: nn.Module, ops: dict[str, str] | None = None, accuracy_level: int = 0,
                max_block: int | None = None) -> Any:
    """The ONNX model of a (quantized) transformers BertModel; `ops` picks, per Linear name
    (`encoder.layer.0.attention.self.qkv` for the stacked projection), one of
    lowbit.runtimes.onnx_modules' ops."""
    from onnx import TensorProto

    config = model.config
    gelu = GELUS.get(config.hidden_act)
    if gelu is None:
        raise ExportError(f"activation {config.hidden_act!r} has no fused ONNX Runtime kernel here")
    build = _Encoder(Graph("lowbit-bert", max_block=max_block), ops or {}, accuracy_level)
    batch = ["batch", "sequence"]
    ids, mask, token_types = (build.graph.add_input(name, TensorProto.INT64, batch) for name in INPUTS)
    hidden = build.embeddings(model.embeddings, ids, token_types)
    padding = build.graph.node("Cast", [mask], to=TensorProto.INT32)
    for index, layer in enumerate(model.encoder.layer):
        hidden = build.layer(layer, hidden, padding, config.num_attention_heads, gelu,
                             f"encoder.layer.{index}")
    build.graph.add_output(hidden, "last_hidden_state", TensorProto.FLOAT, [*batch, config.hidden_size])
    if getattr(model, "pooler", None) is not None:
        build.graph.add_output(build.pooler(model.pooler, hidden), "pooler_output", TensorProto.FLOAT,
                               ["batch", config.hidden_size])
    return build.graph.model("lowbit")
