"""SmolLM2-135M: fp32 vs lowbit (PyTorch and ONNX Runtime runtimes) vs torch.ao quantize_dynamic vs
ONNX Runtime fp32 and int8, side by side.

Measures, in one process on the same tokens and thread count: perplexity on the Wikipedia corpus
(sliding windows of 512 tokens, stride 256, the first --tokens tokens), greedy decode tokens/s at
batch 1 after a 64-token prompt (with the KV cache, median of interleaved rounds), prefill
tokens/s on that prompt, and size on disk. ONNX Runtime runs a graph exported with torch's dynamo
exporter that takes and returns the KV cache as two stacked tensors (about 2.5 minutes to
export). With llama-cpp-python installed (`make bench-llamacpp` builds it once), llama.cpp's Q8_0
and Q4_0 files of the same weights join as peers (bench.llamacpp). Prints one table with ratios
against fp32 and the best peer; writes bench/results/smollm2.json.

    .venv/bin/python -m bench.smollm2 [--threads 2] [--runs 5] [--tokens 4096]
"""

from __future__ import annotations

import math
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import lowbit
from bench import llamacpp
from bench.common import (
    bench_arguments,
    export_onnx,
    onnx_bytes,
    onnx_int8,
    onnx_session,
    print_table,
    write_json,
)
from lowbit.data import assets
from lowbit.data.batches import language_model_windows
from lowbit.evaluate import folder_bytes
from lowbit.families import transformers as hf

PROMPT_TOKENS, NEW_TOKENS = 64, 64
# lowbit models also saved for the onnxruntime runtime: (MatMulNBits accuracy level, longest block)
# (4: int8 activations per block, as llama.cpp computes, over blocks of 16 when asked; 0: float32,
# lowbit's exact numerics).
ONNX_VARIANTS = {"w8": ((4, None), (4, 16)), "w4-g64": ((0, None), (4, None), (4, 16))}
# 576, the hidden size, is not a multiple of 128: 4-bit groups of 64 (and the weights came from
# Q4_1 groups of 32, which an asymmetric g32 quantizer would reproduce exactly).
LOWBIT_RECIPES = {"w8": lowbit.PRESETS["w8"], "w8a8-dynamic": lowbit.PRESETS["w8a8-dynamic"],
                  "w4-g64": lowbit.Recipe(weights="int4", granularity="group:64", symmetric=False)}


@dataclass
class Contender:
    """One model as two functions: all logits of a window, and seconds to decode n tokens."""

    logits: Callable[[torch.Tensor], torch.Tensor]
    decode: Callable[[torch.Tensor, int], tuple[float, float]]
    size_bytes: int


def torch_contender(model: torch.nn.Module, size_bytes: int) -> Contender:
    def logits(ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids).logits

    def decode(prompt: torch.Tensor, new_tokens: int) -> tuple[float, float]:
        start = time.perf_counter()
        output = model(input_ids=prompt, use_cache=True)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(new_tokens):
            token = output.logits[:, -1:].argmax(-1)
            output = model(input_ids=token, past_key_values=output.past_key_values, use_cache=True)
        return prefill, time.perf_counter() - start

    return Contender(logits, decode, size_bytes)


class CachedStep(torch.nn.Module):
    """(input_ids, past keys, past values) -> (logits, keys, values), the cache of every layer
    stacked into one tensor each, so that an exported graph can carry it between calls."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.layers = model, model.config.num_hidden_layers

    def forward(self, input_ids, past_keys, past_values):
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache()
        for layer in range(self.layers):
            cache.update(past_keys[layer], past_values[layer], layer)
        start = past_keys.shape[3]
        positions = torch.arange(start, start + input_ids.shape[1]).unsqueeze(0)
        logits = self.model(input_ids=input_ids, past_key_values=cache, position_ids=positions,
                            use_cache=True).logits
        keys = torch.stack([cache.layers[i].keys for i in range(self.layers)])
        values = torch.stack([cache.layers[i].values for i in range(self.layers)])
        return logits, keys, values


def empty_cache(config) -> np.ndarray:
    head_dim = config.hidden_size // config.num_attention_heads
    return np.zeros((config.num_hidden_layers, 1, config.num_key_value_heads, 0, head_dim), np.float32)


def onnx_contender(path: Path, config, threads: int) -> Contender:
    session = onnx_session(path, threads)

    def step(ids: np.ndarray, keys: np.ndarray, values: np.ndarray):
        return session.run(None, {"input_ids": ids, "past_keys": keys, "past_values": values})

    def logits(ids: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(step(ids.numpy(), empty_cache(config), empty_cache(config))[0])

    def decode(prompt: torch.Tensor, new_tokens: int) -> tuple[float, float]:
        start = time.perf_counter()
        output, keys, values = step(prompt.numpy(), empty_cache(config), empty_cache(config))
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(new_tokens):
            output, keys, values = step(output[:, -1:].argmax(-1), keys, values)
        return prefill, time.perf_counter() - start

    return Contender(logits, decode, onnx_bytes(path))


def export_cached_step(model: torch.nn.Module, path: Path) -> Path:
    config, dim = model.config, torch.export.Dim
    head_dim = config.hidden_size // config.num_attention_heads
    past = torch.zeros(config.num_hidden_layers, 1, config.num_key_value_heads, 4, head_dim)
    past_length = dim("past")
    return export_onnx(CachedStep(model).eval(), (torch.randint(0, 1000, (1, 3)), past, past),
                       ["input_ids", "past_keys", "past_values"], ["logits", "keys", "values"], path,
                       {"input_ids": {1: dim("tokens")}, "past_keys": {3: past_length},
                        "past_values": {3: past_length}})


def lowbit_onnx_contender(folder: Path) -> Contender:
    """A lowbit folder saved with runtime="onnxruntime", loaded and run as a user would: logits
    from its forward, decode timed through its generate() (OnnxCausalLM.timed_generation)."""
    model = lowbit.load(folder)

    return Contender(lambda ids: model(ids).logits, model.timed_generation, onnx_bytes(folder / "model.onnx"))


def llamacpp_contenders(threads: int) -> dict[str, Contender]:
    """llama.cpp Q8_0 and Q4_0 (bench.llamacpp), or none with a note when it is not installed."""
    if not llamacpp.available():
        print("llama.cpp is not installed: `make bench-llamacpp` builds it and adds its rows")
        return {}
    contenders = {}
    for kind in llamacpp.DECODE_TYPES:
        model = llamacpp.LlamaCpp(llamacpp.quantized_gguf(kind, threads), threads)
        contenders[f"llama.cpp {kind}"] = Contender(model.logits, model.timed_decode, model.size_bytes)
    return contenders


def build_contenders(threads: int, scratch: Path) -> dict[str, Contender]:
    from transformers import AutoModelForCausalLM

    path = hf.smollm2_path()
    fp32 = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    contenders = {"fp32": torch_contender(fp32, folder_bytes(path / "model.safetensors"))}
    for name, recipe in LOWBIT_RECIPES.items():
        quantized = lowbit.quantize(fp32, recipe, progress=False)
        lowbit.save(quantized, scratch / name, runtime="torch")
        contenders[f"lowbit {name}"] = torch_contender(quantized, folder_bytes(scratch / name))
        for level, block in ONNX_VARIANTS.get(name, ()):
            folder = scratch / f"{name}-ort-{level}-{block}"
            lowbit.save(quantized, folder, runtime="onnxruntime", accuracy_level=level,
                        activation_block=block)
            activations = (" int8-act" if level == 4 else "") + (f"/{block}" if block else "")
            label = f"lowbit {name} ort{activations}"
            contenders[label] = lowbit_onnx_contender(folder)
    torchao = torch.ao.quantization.quantize_dynamic(fp32, {torch.nn.Linear}, dtype=torch.qint8)
    torch.save(torchao.state_dict(), scratch / "torchao.pt")
    contenders["torch.ao dynamic"] = torch_contender(torchao, folder_bytes(scratch / "torchao.pt"))
    onnx_fp32 = export_cached_step(fp32, scratch / "fp32.onnx")
    contenders["ort fp32"] = onnx_contender(onnx_fp32, fp32.config, threads)
    contenders["ort int8"] = onnx_contender(onnx_int8(onnx_fp32, scratch / "int8.onnx"), fp32.config, threads)
    return contenders | llamacpp_contenders(threads)


def perplexity(logits_of: Callable[[torch.Tensor], torch.Tensor], windows: list[dict]) -> float:
    """exp(mean NLL) over every scored token of the sliding windows, from `logits_of(ids)`."""
    total, count = 0.0, 0
    with torch.inference_mode():
        for window in windows:
            logits, labels = logits_of(window["input_ids"]).float(), window["labels"][:, 1:]
            total += float(F.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=-100,
                                           reduction="sum"))
            count += int((labels != -100).sum())
    return math.exp(total / count)


def decode_speed(contenders: dict[str, Contender], prompt: torch.Tensor, rounds: int,
                 new_tokens: int = NEW_TOKENS) -> dict[str, dict]:
    """Median prefill and decode tokens/s over `rounds` interleaved rounds (one untimed first), each
    decoding `new_tokens` greedy tokens; each round in its own shuffled order, so that no contender
    always follows the same one (in a fixed order each ONNX Runtime row ran right after its
    PyTorch row)."""
    prefill = {name: [] for name in contenders}
    decode = {name: [] for name in contenders}
    for round_index in range(rounds + 1):
        order = list(contenders)
        random.Random(round_index).shuffle(order)
        for name in order:
            seconds_prefill, seconds_decode = contenders[name].decode(prompt, new_tokens)
            if round_index:
                prefill[name].append(prompt.shape[1] / seconds_prefill)
                decode[name].append(new_tokens / seconds_decode)
    return {name: {"prefill_tokens_per_second": float(np.median(prefill[name])),
                   "decode_tokens_per_second": float(np.median(decode[name]))} for name in contenders}


def main() -> None:
    args = bench_arguments(__doc__, runs=5, extra={"--tokens": 4096})
    tokenizer = hf.load_tokenizer(hf.smollm2_path())
    texts = [document["extract"] for document in assets.wikipedia_documents()]
    windows = language_model_windows(tokenizer, texts, 512, args.tokens)
    with tempfile.TemporaryDirectory(prefix="lowbit-bench-") as scratch, torch.inference_mode():
        contenders = build_contenders(args.threads, Path(scratch))
        scores = {name: perplexity(contender.logits, windows) for name, contender in contenders.items()}
        speeds = decode_speed(contenders, windows[0]["input_ids"][:, :PROMPT_TOKENS], args.runs)
    fp32_decode = speeds["fp32"]["decode_tokens_per_second"]
    peers = [name for name in contenders if not name.startswith(("fp32", "lowbit"))]
    best_peer = max(speeds[name]["decode_tokens_per_second"] for name in peers)
    rows = [{"model": name, "size_mb": contender.size_bytes / 1e6, "perplexity": scores[name],
             "perplexity_vs_fp32": scores[name] / scores["fp32"], **speeds[name],
             "decode_vs_fp32": speeds[name]["decode_tokens_per_second"] / fp32_decode,
             "decode_vs_best_peer": speeds[name]["decode_tokens_per_second"] / best_peer}
            for name, contender in contenders.items()]
    scored = sum(int((window["labels"] != -100).sum()) for window in windows)
    print_table(f"SmolLM2-135M, {args.threads} threads, perplexity over {scored} tokens, measured now "
                "(×: above 1 is faster)",
                rows, [("model", "model"), ("size_mb", "MB"), ("perplexity", "perplexity"),
                       ("perplexity_vs_fp32", "× fp32 ppl"), ("prefill_tokens_per_second", "prefill tok/s"),
                       ("decode_tokens_per_second", "decode tok/s"), ("decode_vs_fp32", "× fp32"),
                       ("decode_vs_best_peer", "× best peer")])
    print(f"results: {write_json('smollm2', {'threads': args.threads, 'tokens': args.tokens, 'rows': rows})}")


if __name__ == "__main__":
    main()
