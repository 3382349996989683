"""Measure: quality metrics, latency and size, and size estimates (labelled as estimates)."""

from lowbit.evaluate.estimate import Estimate, estimate
from lowbit.evaluate.latency import LatencyStats, measure_latencies, measure_latency
from lowbit.evaluate.metrics import mean_cosine, sqnr_db
from lowbit.evaluate.size import folder_bytes, parameter_bytes

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
