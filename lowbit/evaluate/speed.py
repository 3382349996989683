"""Speed of two models on the same inputs: latency per batch size (interleaved), throughput, and
for causal language models prefill and decode tokens per second."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from lowbit.data.batches import call_model
from lowbit.evaluate.benchmark import measure_latencies


def compare_latency(
    models: dict[str, nn.Module], inputs: dict[str, Any], runs: int = 20, threads: int | None = None,
) -> dict[str, dict[str, dict[str, float]]]:
    """{model: {batch label: {p50, p95, p99, mean, runs, threads, throughput}}}.

    Models are timed interleaved at each batch size; throughput is samples per second at p50.
    """
    results: dict[str, dict[str, dict[str, float]]] = {name: {} for name in models}
    for label, batch in inputs.items():
        calls = {name: (lambda m=model, b=batch: call_model(m, b)) for name, model in models.items()}
        for name, stats in measure_latencies(calls, runs=runs, threads=threads).items():
            entry = stats.to_dict()
            entry["throughput"] = _batch_size(batch) / (stats.p50 / 1000.0)
            results[name][label] = entry
    return results


def _batch_size(batch: Any) -> int:
    if isinstance(batch, dict):
        batch = next(iter(batch.values()))
    if isinstance(batch, (tuple, list)):
        batch = batch[0]
    return int(batch.shape[0])


def generation_speed(
    model: nn.Module, input_ids: torch.Tensor, new_tokens: int = 32, threads: int | None = None,
) -> dict[str, float]:
    """Prefill tokens/s on the prompt, then greedy decode tokens/s with the KV cache (batch 1)."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            model(input_ids=input_ids[:, :8], use_cache=True)  # warm-up
            start = time.perf_counter()
            output = model(input_ids=input_ids, use_cache=True)
            prefill = time.perf_counter() - start
            past, token = output.past_key_values, output.logits[:, -1:].argmax(-1)
            start = time.perf_counter()
            for _ in range(new_tokens):
                output = model(input_ids=token, past_key_values=past, use_cache=True)
                past, token = output.past_key_values, output.logits[:, -1:].argmax(-1)
            decode = time.perf_counter() - start
    finally:
        torch.set_num_threads(previous)
    return {"prefill_tokens_per_second": input_ids.shape[1] / prefill,
            "decode_tokens_per_second": new_tokens / decode, "prompt_tokens": input_ids.shape[1],
            "new_tokens": new_tokens}
