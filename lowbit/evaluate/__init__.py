"""Measure: quality metrics, latency and size, and size estimates (labelled as estimates)."""

from lowbit.evaluate.benchmark import (
    LatencyStats,
    folder_bytes,
    measure_latencies,
    measure_latency,
    parameter_bytes,
)
from lowbit.evaluate.estimate import Estimate, estimate
from lowbit.evaluate.metrics import mean_cosine, sqnr_db

__all__ = [
    "Estimate",
    "LatencyStats",
    "estimate",
    "folder_bytes",
    "mean_cosine",
    "measure_latencies",
    "measure_latency",
    "parameter_bytes",
    "sqnr_db",
]
