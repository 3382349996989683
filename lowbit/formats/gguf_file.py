"""GGUF files for llama.cpp (and Ollama, LM Studio): a quantized Llama-architecture transformers
model written with lowbit's own integers and scales in llama.cpp's block types.

A GGUF block type fixes its block structure, so lowbit's algorithm (RTN, GPTQ) chooses the
integers inside exactly that structure and the file holds them unchanged:
- Q8_0: 32 int8 values and one float16 scale, x = d·q;
- Q5_0: 32 5-bit values and one float16 scale, x = d·(q − 16), lowbit's symmetric int5 as stored
  (unsigned, zero point 16);
- Q4_0: 32 4-bit values and one float16 scale, x = d·(q − 8), lowbit's symmetric int4 as stored
  (unsigned, zero point 8);
- Q4_1: 32 4-bit values, a float16 scale and a float16 minimum, x = d·q + m, lowbit's asymmetric
  int4 with a minimum (`zero_point="minimum"`).
A model quantized with `scale_dtype="float16"` and groups of 32 (the `q8_0`, `q5_0`, `q4_0` and
`q4_1` recipes, and their `-gptq` variants) fits; anything else is refused with the module's
name rather than requantized, so dequantizing the file (llama.cpp, or the `gguf` package) gives
exactly lowbit's dequantized weights. Norms and float modules are written in float32.

The metadata follows llama.cpp's `llama` architecture; the tokenizer is a GPT-2-style byte-level
BPE from tokenizer.json, with merges, special tokens and chat template (gguf.SpecialVocab).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lowbit.core import QuantizedTensor
from lowbit.errors import FormatError, LowbitWarning
from lowbit.formats.atomic import atomic_file

ARCHITECTURES = ("LlamaForCausalLM",)  # what llama.cpp's `llama` architecture holds as lowbit maps it
BLOCK = 32  # values per block in every type lowbit writes
# lowbit's presets whose models export
GGUF_RECIPES = ("q8_0", "q5_0", "q5_0-gptq", "q5_0-awq-gptq", "q4_0", "q4_0-gptq", "q4_0-awq-gptq",
                "q4_1", "q4_1-gptq", "q4_1-awq-gptq")
# tokenizer.json pre-tokenizers whose splitting llama.cpp reproduces, by llama.cpp's name for it
PRE_TOKENIZERS = {
    json.dumps({"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
               sort_keys=True): "gpt-2",
}


class GGUFError(FormatError):
    """A model, module or tokenizer GGUF cannot hold as lowbit quantized it; the message says which."""


@dataclass(frozen=True)
class BlockType:
    """One llama.cpp block type: which lowbit weights it holds exactly, and their bytes per row."""

    name: str
    weight: str  # lowbit's weight type it holds ("int8", "int5", "int4")
    encode: Callable[[QuantizedTensor], np.ndarray]  # (rows, bytes per row)
    symmetric: bool = True  # a symmetric grid; else one with a float16 minimum (LayerSpec.zero_point)


def _codes(weight: QuantizedTensor, dtype: type) -> np.ndarray:
    """The integers as (rows, blocks, 32), in `dtype`."""
    return weight.data.reshape(weight.data.shape[0], -1, BLOCK).numpy().astype(dtype)


def _halves(weight: QuantizedTensor, values: torch.Tensor) -> np.ndarray:
    """One float16 per block (a scale or a minimum) as its two bytes, (rows, blocks, 2)."""
    return values.reshape(weight.data.shape[0], -1, 1).numpy().astype(np.float16).view(np.uint8)


def _rows(weight: QuantizedTensor, *fields: np.ndarray) -> np.ndarray:
    """Each block's float16 scale followed by `fields` (its other bytes), as (rows, bytes per row)."""
    return np.concatenate([_halves(weight, weight.scale), *fields], axis=-1).reshape(weight.data.shape[0], -1)


def _low_nibbles(codes: np.ndarray) -> np.ndarray:
    """Each block's 32 values' low 4 bits, two per byte: value j low, value j + 16 high."""
    low = codes & 0x0F
    return low[..., : BLOCK // 2] | (low[..., BLOCK // 2:] << 4)


def _q8_0(weight: QuantizedTensor) -> np.ndarray:
    return _rows(weight, _codes(weight, np.int8).view(np.uint8))


def _q5_0(weight: QuantizedTensor) -> np.ndarray:
    codes = _codes(weight, np.uint8)  # 0..31, zero point 16
    high_bits = np.packbits(codes >> 4, axis=-1, bitorder="little")  # bit j of 32: value j's fifth bit
    return _rows(weight, high_bits, _low_nibbles(codes))


def _q4_0(weight: QuantizedTensor) -> np.ndarray:
    return _rows(weight, _low_nibbles(_codes(weight, np.uint8)))  # 0..15, zero point 8


def _q4_1(weight: QuantizedTensor) -> np.ndarray:
    return _rows(weight, _halves(weight, weight.minimum), _low_nibbles(_codes(weight, np.uint8)))  # 0..15


BLOCK_TYPES = {"Q8_0": BlockType("Q8_0", "int8", _q8_0), "Q5_0": BlockType("Q5_0", "int5", _q5_0),
               "Q4_0": BlockType("Q4_0", "int4", _q4_0), "Q4_1": BlockType("Q4_1", "int4", _q4_1, False)}
# a weight grid in words, by (LayerSpec.symmetric, LayerSpec.zero_point)
GRIDS = {(True, "int"): "symmetric", (False, "int"): "asymmetric with integer zero points",
         (False, "float"): "asymmetric with float zero points",
         (False, "minimum"): "asymmetric with a minimum"}
FILE_TYPES = {"Q8_0": "MOSTLY_Q8_0", "Q5_0": "MOSTLY_Q5_0", "Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1",
              "F32": "ALL_F32"}


@dataclass
class GGUFTensor:
    """One tensor as the file holds it: its GGUF name, type and data (bytes per row, or floats)."""

    name: str
    kind: str  # a name in BLOCK_TYPES, or "F32"
    data: np.ndarray


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise GGUFError("GGUF export needs the gguf package: pip install 'lowbit[gguf]'") from None
    return gguf


def block_type_for(name: str, module: nn.Module) -> BlockType:
    """The block type that holds `module`'s quantized weight exactly, or a GGUFError saying why none does."""
    spec = module.spec
    held = spec.symmetric or spec.zero_point == "minimum"  # blocks offset by a midpoint or by a minimum
    kind = next((k for k in BLOCK_TYPES.values()
                 if held and (k.weight, k.symmetric) == (spec.weight, spec.symmetric)), None)
    reasons = []
    if kind is None:
        reasons.append(f"{spec.weight} weights, {GRIDS[spec.symmetric, spec.zero_point]}, have no GGUF block "
                       "type (it holds symmetric int8, int5 and int4, and int4 with a minimum)")
    if spec.granularity != f"group:{BLOCK}":
        reasons.append(f"{spec.granularity} weights are not GGUF blocks (groups of {BLOCK})")
    for field in ("scale", "minimum"):
        values = getattr(module, f"weight_{field}", None)
        if values is not None and not torch.equal(values.half().float(), values):
            reasons.append(f"its {field}s are not float16 values")
    if reasons:
        raise GGUFError(f"{name}: {'; '.join(reasons)}. Quantize with a GGUF recipe "
                        f"({', '.join(GGUF_RECIPES)}) to export to GGUF")
    return kind


def _quantized_tensor(name: str, target: str, module: nn.Module) -> GGUFTensor:
    """Module `name`'s weight as GGUF tensor `target`, in the block type that holds it exactly."""
    kind = block_type_for(name, module)
    weight = module.quantized_weight()
    midpoint = 2 ** (weight.qtype.bits - 1)  # symmetric grids stored unsigned sit on it
    if kind.symmetric and not weight.qtype.is_signed and not bool((weight.zero_point == midpoint).all()):
        raise GGUFError(f"{name}: {kind.name} needs lowbit's symmetric {kind.weight} (zero point {midpoint} "
                        "in every group)")
    return GGUFTensor(target, kind.name, kind.encode(weight))


def _float_tensor(name: str, tensor: torch.Tensor) -> GGUFTensor:
    return GGUFTensor(name, "F32", tensor.detach().float().numpy().copy())


def _permuted_rows(tensor: GGUFTensor, heads: int) -> GGUFTensor:
    """Q and K rows in llama.cpp's rotary layout: transformers rotates the two halves of each
    head, llama.cpp interleaved pairs; a permutation of whole rows, so blocks stay intact."""
    rows = tensor.data.shape[0]
    order = np.arange(rows).reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(-1)
    return GGUFTensor(tensor.name, tensor.kind, np.ascontiguousarray(tensor.data[order]))


def _module_tensors(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if isinstance(getattr(module, "weight", None), torch.Tensor) and not any(module.children()):
            yield name, module


def model_tensors(model: nn.Module) -> list[GGUFTensor]:
    """Every weight (and bias) of a Llama-architecture model under its GGUF name, in order."""
    gguf = _gguf()

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    tensors = []
    for name, module in _module_tensors(model):
        target = names.get_name(f"{name}.weight", try_suffixes=(".weight",))
        if target is None:
            raise GGUFError(f"{name}: llama.cpp's llama architecture has no tensor for this module")
        integers = hasattr(module, "spec") and module.spec.weight not in ("fp16", "bf16")
        found = [_quantized_tensor(name, target, module) if integers
                 else _float_tensor(target, _float_weight(module))]
        if getattr(module, "bias", None) is not None:
            found.append(_float_tensor(target.replace(".weight", ".bias"), module.bias))
        role = target.split(".")[-2]
        tensors += [_permuted_rows(t, heads[role]) if role in heads else t for t in found]
    return _untied(tensors)


def _float_weight(module: nn.Module) -> torch.Tensor:
    return module.dequantized_weight() if hasattr(module, "dequantized_weight") else module.weight


def _untied(tensors: list[GGUFTensor]) -> list[GGUFTensor]:
    """Without the output tensor where it equals the token embedding: llama.cpp then uses the
    embedding as the LM head, and the file holds the table once."""
    by_name = {t.name: t for t in tensors}
    output, embedding = by_name.get("output.weight"), by_name.get("token_embd.weight")
    if output is not None and embedding is not None and output.kind == embedding.kind \
            and np.array_equal(output.data, embedding.data):
        tensors = [t for t in tensors if t is not output]
    return tensors


def _check_architecture(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    architectures = list(getattr(config, "architectures", None) or [])
    if not set(architectures) & set(ARCHITECTURES):
        raise GGUFError(f"GGUF export supports {', '.join(ARCHITECTURES)}; this model is "
                        f"{', '.join(architectures) or type(model).__name__}")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise GGUFError(f"GGUF export does not write rope scaling yet; this model's config has {rope}")


def _rope_theta(config: Any) -> float:
    parameters = getattr(config, "rope_parameters", None) or {}
    return float(parameters.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _write_architecture(writer: Any, config: Any, file_type: str, name: str | None) -> None:
    gguf = _gguf()

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(name or Path(str(getattr(config, "_name_or_path", "") or "model")).name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType[FILE_TYPES[file_type]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _write_tokenizer(writer: Any, folder: Path, vocab_size: int) -> None:
    """GPT-2-style byte-level BPE: tokens by id with their types, merges, special ids, template."""
    gguf = _gguf()

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise GGUFError(f"{folder} has no tokenizer.json; GGUF export needs the model's fast tokenizer")
    tokenizer = json.loads(path.read_text(encoding="utf-8"))
    model = tokenizer.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback") or \
            (tokenizer.get("decoder") or {}).get("type") != "ByteLevel":
        raise GGUFError("GGUF export supports byte-level BPE tokenizers (GPT-2 style); this one is "
                        f"{model.get('type')} with a {(tokenizer.get('decoder') or {}).get('type')} decoder")
    tokens = {token_id: text for text, token_id in model["vocab"].items()}
    types = dict.fromkeys(tokens, gguf.TokenType.NORMAL)
    for added in tokenizer.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    if max(tokens) >= vocab_size:
        raise GGUFError(f"the tokenizer has token id {max(tokens)}, beyond the model's {vocab_size} "
                        "embeddings")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(tokenizer.get("pre_tokenizer")))
    writer.add_token_list([tokens.get(i, f"[PAD{i}]") for i in range(vocab_size)])
    writer.add_token_types([types.get(i, gguf.TokenType.UNUSED) for i in range(vocab_size)])
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)


def _pre_tokenizer(pre_tokenizer: dict | None) -> str:
    name = PRE_TOKENIZERS.get(json.dumps(pre_tokenizer, sort_keys=True))
    if name is None:
        warnings.warn("lowbit does not know which llama.cpp pre-tokenizer splits text as this model's "
                      "tokenizer does; the GGUF file says 'default', and llama.cpp may tokenize "
                      "differently from transformers", LowbitWarning, stacklevel=3)
        return "default"
    return name


def _file_type(tensors: list[GGUFTensor]) -> str:
    """The block type of most quantized values: what llama.cpp reports as the file's type."""
    counts: dict[str, int] = {}
    for tensor in tensors:
        if tensor.kind != "F32" and tensor.name != "token_embd.weight":
            counts[tensor.kind] = counts.get(tensor.kind, 0) + tensor.data.size
    return max(counts, key=counts.get) if counts else "F32"


def export_gguf(model: nn.Module, tokenizer_folder: str | Path, path: str | Path,
                overwrite: bool = False, name: str | None = None) -> list[GGUFTensor]:
    """Write a lowbit-quantized Llama-architecture transformers model (its tokenizer read from
    `tokenizer_folder`, e.g. the folder it was loaded from) as a GGUF file at `path`, atomically,
    under `name` (what llama.cpp and Ollama show; default: the model's folder name); returns the
    tensors written."""
    gguf = _gguf()

    _check_architecture(model)
    tensors = model_tensors(model)
    with atomic_file(Path(path), overwrite) as staging:
        writer = gguf.GGUFWriter(staging, "llama")
        _write_architecture(writer, model.config, _file_type(tensors), name)
        _write_tokenizer(writer, Path(tokenizer_folder), model.config.vocab_size)
        for tensor in tensors:
            raw = None if tensor.kind == "F32" else gguf.GGMLQuantizationType[tensor.kind]
            writer.add_tensor(tensor.name, tensor.data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return tensors
