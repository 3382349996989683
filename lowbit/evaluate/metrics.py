"""Quality metrics that compare a quantized model's outputs with the original's on the same inputs.

Per-sample scores feed `bootstrap_difference`, which puts a 95% interval on the change in a
metric by resampling the samples (both models are scored on the same resample each time).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


def mean_cosine(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """Mean cosine similarity of matching rows (e.g. sentence embeddings), 1.0 when identical."""
    return float(cosine_per_sample(reference, candidate).mean())


def cosine_per_sample(reference: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(reference.float().flatten(1), candidate.float().flatten(1), dim=-1)


def sqnr_db(reference: torch.Tensor | np.ndarray, candidate: torch.Tensor | np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB (tensors or numpy arrays); +inf when identical."""
    reference, candidate = torch.as_tensor(reference).double(), torch.as_tensor(candidate).double()
    noise = float((reference - candidate).pow(2).sum())
    signal = float(reference.pow(2).sum())
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.asarray(predictions) == np.asarray(labels)))


def macro_f1(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Unweighted mean of per-class F1 over the classes present in labels or predictions."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    scores = []
    for cls in np.union1d(predictions, labels):
        true_positive = np.sum((predictions == cls) & (labels == cls))
        predicted, actual = np.sum(predictions == cls), np.sum(labels == cls)
        precision = true_positive / predicted if predicted else 0.0
        recall = true_positive / actual if actual else 0.0
        scores.append(0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall))
    return float(np.mean(scores)) if scores else 0.0


def top1_agreement(reference_logits: torch.Tensor, candidate_logits: torch.Tensor) -> float:
    """Fraction of samples whose arg-max class is the same for both models."""
    return float((reference_logits.argmax(-1) == candidate_logits.argmax(-1)).float().mean())


def perplexity(negative_log_likelihood: float, tokens: int) -> float:
    """exp(mean negative log-likelihood per predicted token)."""
    return math.exp(negative_log_likelihood / max(tokens, 1))


def bootstrap_difference(
    samples: int,
    score: Callable[[np.ndarray], tuple[float, float]],
    resamples: int = 1000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Change in a metric (quantized − original) and its 95% bootstrap interval.

    `score(indices)` returns (original, quantized) metric values on those samples; each resample
    draws the same samples for both models, so the interval is for the paired difference.
    """
    original, quantized = score(np.arange(samples))
    difference = quantized - original
    if samples < 2 or resamples < 1 or not math.isfinite(difference):
        return float(difference), float(difference), float(difference)
    generator = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples):
        original, quantized = score(generator.integers(0, samples, samples))
        draws.append(quantized - original)
    low, high = np.percentile(draws, [2.5, 97.5])
    return float(difference), float(low), float(high)


def speedup_interval(
    original_ms: Sequence[float], quantized_ms: Sequence[float], resamples: int = 1000, seed: int = 0,
) -> tuple[float, float]:
    """95% bootstrap interval of median(original) / median(quantized) over paired timings.

    The timings are interleaved (run i of both models back to back), so run indices are
    resampled together: load that hits both models alike cancels out of the ratio.
    """
    original, quantized = np.asarray(original_ms, float), np.asarray(quantized_ms, float)
    runs = min(len(original), len(quantized))
    if runs < 2:
        ratio = float(np.median(original) / np.median(quantized)) if runs else math.nan
        return ratio, ratio
    generator = np.random.default_rng(seed)
    draws = generator.integers(0, runs, (resamples, runs))
    ratios = np.median(original[:runs][draws], axis=1) / np.median(quantized[:runs][draws], axis=1)
    low, high = np.percentile(ratios, [2.5, 97.5])
    return float(low), float(high)


def is_finite(value: Any) -> bool:
    """Whether every number in `value` (a tensor, an array, a model output, nested) is finite."""
    if isinstance(value, torch.Tensor):
        return bool(torch.isfinite(value).all()) if value.is_floating_point() else True
    if isinstance(value, np.ndarray):
        return bool(np.isfinite(value).all()) if np.issubdtype(value.dtype, np.floating) else True
    if isinstance(value, dict):
        return all(is_finite(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return all(is_finite(item) for item in value)
    return not isinstance(value, float) or math.isfinite(value)
