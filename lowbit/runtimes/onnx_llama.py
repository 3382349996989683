"""Llama-architecture causal LMs (Llama, SmolLM2) as one ONNX graph with a key/value cache, on ONNX
Runtime's fused CPU kernels.

Per layer: RMS norm (fused with the residual add from the second norm on), one quantized matmul
for query, key and value together, grouped-query attention with rotary embeddings applied inside
the kernel and the cache appended in it, the output projection, RMS norm with the residual add,
one matmul for the gate and up projections, SiLU(gate) · up, and the down projection. The
rotary tables come from the model's own rotary module, so its scaling is kept.

Inputs: `input_ids` (batch, new tokens), `attention_mask` (batch, past + new tokens, no
padding), and per layer `past_key_values.{i}.key` / `.value` (batch, kv heads, past, head size).
Outputs: `logits` (batch, new tokens, vocabulary) and `present.{i}.key` / `.value`, the past
for the next call.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from lowbit.runtimes.onnx_graph import MICROSOFT, Graph
from lowbit.runtimes.onnx_modules import ExportError, GraphBuild, emit_embedding, stacked


class _Decoder(GraphBuild):
    """A Llama decoder's graph being built, block by block."""

    def weight(self, norm: nn.Module) -> str:
        return self.graph.constant("gamma", norm.weight.detach().float().numpy())

    def rms_norm(self, x: str, norm: nn.Module) -> str:
        return self.graph.node("RMSNormalization", [x, self.weight(norm)], axis=-1,
                               epsilon=float(norm.variance_epsilon))

    def skip_rms_norm(self, x: str, skip: str, norm: nn.Module) -> tuple[str, str]:
        """(RMS norm of x + skip, x + skip): the residual add and the next norm in one kernel."""
        normed, _, _, total = self.graph.node("SkipSimplifiedLayerNormalization",
                                              [x, skip, self.weight(norm)], outputs=4, domain=MICROSOFT,
                                              epsilon=float(norm.variance_epsilon))
        return normed, total

    def attention(self, attention: nn.Module, x: str, past: tuple[str, str], lengths: tuple[str, str],
                  rotary: tuple[str, str], heads: tuple[int, int], name: str) -> tuple[str, str, str]:
        graph = self.graph
        projections = [attention.q_proj, attention.k_proj, attention.v_proj]
        qkv = self.linear(stacked(projections), x, f"{name}.self_attn.qkv")
        context, present_key, present_value = graph.node(  # query, key and value packed in one input
            "GroupQueryAttention", [qkv, "", "", *past, *lengths, *rotary], outputs=3, domain=MICROSOFT,
            num_heads=heads[0], kv_num_heads=heads[1], do_rotary=1, rotary_interleaved=0)
        return self.linear(attention.o_proj, context, f"{name}.self_attn.o_proj"), present_key, present_value

    def mlp(self, mlp: nn.Module, x: str, name: str) -> str:
        graph = self.graph
        gate_up = self.linear(stacked([mlp.gate_proj, mlp.up_proj]), x, f"{name}.mlp.gate_up")
        widths = self.integers("split", mlp.gate_proj.out_features, mlp.up_proj.out_features)
        gate, up = graph.node("Split", [gate_up, widths], outputs=2, axis=-1)
        silu = graph.node("QuickGelu", [gate], domain=MICROSOFT, alpha=1.0)  # x · sigmoid(1.0 · x)
        activated = graph.node("Mul", [silu, up])
        return self.linear(mlp.down_proj, activated, f"{name}.mlp.down_proj")


def _rotary_tables(model: nn.Module) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of every position (max positions × half the head size), from the model's own
    rotary module: GroupQueryAttention rotates the two halves of each head, as transformers does."""
    config = model.config
    positions = int(config.max_position_embeddings)
    head_size = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    probe = torch.zeros(1, positions, head_size)
    with torch.no_grad():
        cos, sin = model.model.rotary_emb(probe, torch.arange(positions)[None])
    half = head_size // 2
    return cos[0, :, :half].float().numpy().copy(), sin[0, :, :half].float().numpy().copy()


def _check(model: nn.Module) -> None:
    config = model.config
    biased = getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)
    if config.hidden_act != "silu" or biased:
        raise ExportError(f"{type(model).__name__}: only SiLU Llama blocks without biases export today "
                          f"(hidden_act {config.hidden_act!r})")


def build_llama(model: nn.Module, ops: dict[str, str] | None = None, accuracy_level: int = 0,
                max_block: int | None = None) -> Any:
    """The ONNX model of a (quantized) transformers LlamaForCausalLM; `ops` picks, per Linear name
    (`model.layers.0.self_attn.qkv`, `model.layers.0.mlp.gate_up` for the stacked ones), one of
    lowbit.runtimes.onnx_modules' ops."""
    from onnx import TensorProto

    _check(model)
    config = model.config
    build = _Decoder(Graph("lowbit-llama", max_block=max_block), ops or {}, accuracy_level)
    graph = build.graph
    head_size = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    heads = (config.num_attention_heads, config.num_key_value_heads)
    ids = graph.add_input("input_ids", TensorProto.INT64, ["batch", "sequence"])
    mask = graph.add_input("attention_mask", TensorProto.INT64, ["batch", "total_sequence"])
    seen = graph.node("ReduceSum", [mask, build.integers("axis", 1)], keepdims=0)
    last = graph.node("Sub", [seen, build.integers("one", 1)])  # GroupQueryAttention's seqlens_k
    total = graph.node("Squeeze", [graph.node("Shape", [mask], start=1, end=2)])
    lengths = tuple(graph.node("Cast", [value], to=TensorProto.INT32) for value in (last, total))
    cos, sin = _rotary_tables(model)
    rotary = (graph.constant("cos_cache", cos), graph.constant("sin_cache", sin))
    cache = ["batch", heads[1], "past_sequence", head_size]
    hidden = emit_embedding(graph, model.model.embed_tokens, ids, "model.embed_tokens")
    residual, update = None, None
    for index, layer in enumerate(model.model.layers):
        name = f"model.layers.{index}"
        past = tuple(graph.add_input(f"past_key_values.{index}.{part}", TensorProto.FLOAT, cache)
                     for part in ("key", "value"))
        if residual is None:
            normed, residual = build.rms_norm(hidden, layer.input_layernorm), hidden
        else:
            normed, residual = build.skip_rms_norm(update, residual, layer.input_layernorm)
        attended, present_key, present_value = build.attention(layer.self_attn, normed, past, lengths, rotary,
                                                               heads, name)
        present = ["batch", heads[1], "total_sequence", head_size]
        graph.add_output(present_key, f"present.{index}.key", TensorProto.FLOAT, present)
        graph.add_output(present_value, f"present.{index}.value", TensorProto.FLOAT, present)
        normed, residual = build.skip_rms_norm(attended, residual, layer.post_attention_layernorm)
        update = build.mlp(layer.mlp, normed, name)
    final, _ = build.skip_rms_norm(update, residual, model.model.norm)
    logits = build.linear(model.lm_head, final, "lm_head")
    graph.add_output(logits, "logits", TensorProto.FLOAT, ["batch", "sequence", config.vocab_size])
    return graph.model("lowbit")
