"""Latency: repeated timed calls after warm-up, interleaved across models so outside load hits
each alike; latency per batch size and throughput of two models; prefill and decode speed of a
causal language model."""

from __future__ import annotations

import inspect
import os
import random
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn

from lowbit.core.timing import timed
from lowbit.data.batches import call_model

T = TypeVar("T")


@dataclass(frozen=True)
class LatencyStats:
    """Milliseconds per call over `runs` timed calls (after warm-up), and the threads used."""

    p50: float
    p95: float
    p99: float
    mean: float
    runs: int
    threads: int
    timings_ms: tuple[float, ...] = field(default=(), repr=False)

    def to_dict(self) -> dict[str, float | list[float]]:
        data = asdict(self)
        data["timings_ms"] = list(self.timings_ms)
        return data


def _percentile(sorted_values: list[float], fraction: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(fraction * (len(sorted_values) - 1))))
    return sorted_values[index]


def _stats(timings: list[float], threads: int) -> LatencyStats:
    in_order = tuple(timings)
    timings = sorted(timings)
    return LatencyStats(
        p50=_percentile(timings, 0.50),
        p95=_percentile(timings, 0.95),
        p99=_percentile(timings, 0.99),
        mean=statistics.fmean(timings),
        runs=len(timings),
        threads=threads,
        timings_ms=in_order,
    )


def measure_latencies(
    calls: dict[str, Callable[[], object]],
    runs: int = 30,
    warmup: int = 3,
    threads: int | None = None,
) -> dict[str, LatencyStats]:
    """Time several calls interleaved (a, b, c, then b, c, a, ...), `runs` times each after warm-up.

    Interleaving spreads any outside load over every model alike, so ratios between them stay
    fair on a busy machine. The order is shuffled every round (seeded): in a fixed order a model
    always follows the same one, whose worker threads may still be spinning, and would pay for
    it every time. Runs under torch.inference_mode with `threads` torch threads.
    """
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        timings: dict[str, list[float]] = {name: [] for name in calls}
        with torch.inference_mode():
            for call in calls.values():
                for _ in range(warmup):
                    call()
            order, shuffle = list(calls), random.Random(0).shuffle
            for _ in range(runs):
                shuffle(order)
                for name in order:
                    timings[name].append(timed(calls[name])[1] * 1000.0)
        used_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(previous_threads)
    return {name: _stats(values, used_threads) for name, values in timings.items()}


def _machine_load() -> dict[str, Any]:
    """The 1-minute load average and the cores this process may use."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not on this platform
        load = None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"load_average": load, "cores": cores}


def under_machine_load(measure: Callable[[], T]) -> tuple[T, dict[str, Any]]:
    """`measure()`'s result, and the machine's load while it ran (the higher 1-minute load
    average of before and after) with the usable cores: recorded beside timings, since a load
    above the cores means other work shared the CPU while lowbit timed."""
    before = _machine_load()
    result = measure()
    after = _machine_load()
    averages = [entry["load_average"] for entry in (before, after) if entry["load_average"] is not None]
    return result, {"load_average": max(averages) if averages else None, "cores": before["cores"]}


def measure_latency(
    call: Callable[[], object], runs: int = 30, warmup: int = 3, threads: int | None = None
) -> LatencyStats:
    """Time one call `runs` times after `warmup` untimed calls."""
    return measure_latencies({"call": call}, runs, warmup, threads)["call"]


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
        own = getattr(model, "timed_generation", None)  # a model that decodes outside PyTorch
        if own is not None:
            prefill, decode = own(input_ids, new_tokens)
        else:
            with torch.inference_mode():
                model(input_ids=input_ids[:, :8], use_cache=True)  # warm-up
                output, prefill = timed(lambda: model(input_ids=input_ids, use_cache=True))
                _, decode = timed(lambda: _greedy_decode(model, output, new_tokens))
    finally:
        torch.set_num_threads(previous)
    return {"prefill_tokens_per_second": input_ids.shape[1] / prefill,
            "decode_tokens_per_second": new_tokens / decode, "prompt_tokens": input_ids.shape[1],
            "new_tokens": new_tokens}


def _greedy_decode(model: nn.Module, output: Any, new_tokens: int) -> None:
    """`new_tokens` greedy steps after a prefill `output`, one token at a time with the KV cache
    (transformers 5 calls it `cache`, earlier versions `past_key_values`)."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    past, token = output[name], output.logits[:, -1:].argmax(-1)
    for _ in range(new_tokens):
        output = model(input_ids=token, use_cache=True, **{name: past})
        past, token = output[name], output.logits[:, -1:].argmax(-1)
