"""Latency and size measurements: repeated timed runs after warm-up, bytes on disk and in memory."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn


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
    """Time several calls interleaved (a, b, c, a, b, c, ...), `runs` times each after warm-up.

    Interleaving spreads any outside load over every model alike, so ratios between them stay
    fair on a busy machine. Runs under torch.inference_mode with `threads` torch threads.
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
            for _ in range(runs):
                for name, call in calls.items():
                    start = time.perf_counter()
                    call()
                    timings[name].append((time.perf_counter() - start) * 1000.0)
        used_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(previous_threads)
    return {name: _stats(values, used_threads) for name, values in timings.items()}


def measure_latency(
    call: Callable[[], object], runs: int = 30, warmup: int = 3, threads: int | None = None
) -> LatencyStats:
    """Time one call `runs` times after `warmup` untimed calls."""
    return measure_latencies({"call": call}, runs, warmup, threads)["call"]


def folder_bytes(path: str | Path) -> int:
    """Bytes of every file under `path` (a file's own size when `path` is a file)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer the model holds in memory, counted once each."""
    seen, total = set(), 0
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total
