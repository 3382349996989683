"""Activation calibrators: each turns one shared `Histogram` into a clipping range (low, high).

minmax and moving-average minmax read the exact ranges the histogram tracks; percentile, entropy
(KL divergence, as in NVIDIA TensorRT's int8 calibration, Migacz 2017) and MSE search the counts.
Because they share the histogram, all of them can be scored from one pass over the data.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from lowbit.core.histogram import Histogram
from lowbit.core.qtypes import QType, get_qtype
from lowbit.core.quantize import grid_bounds, qparams_from_range
from lowbit.errors import CalibrationError

Range = tuple[float, float]


def minmax_range(histogram: Histogram, qtype: QType, symmetric: bool) -> Range:
    """The exact smallest and largest values seen."""
    return histogram.min, histogram.max


def moving_average_range(histogram: Histogram, qtype: QType, symmetric: bool) -> Range:
    """Exponential moving average of each batch's min and max (robust to one odd batch)."""
    return histogram.average_min, histogram.average_max


def percentile_range(
    histogram: Histogram, qtype: QType, symmetric: bool, percentile: float = 99.99
) -> Range:
    """Clip the (100 - percentile)% most extreme values, split between the two tails."""
    if not 50.0 < percentile <= 100.0:
        raise CalibrationError(f"percentile must lie in (50, 100], got {percentile}")
    tail = (100.0 - percentile) / 200.0 * histogram.total
    cumulative = torch.cumsum(histogram.counts, 0)
    edges = histogram.edges()
    low_bin = int(torch.searchsorted(cumulative, torch.tensor(tail, dtype=torch.float64)))
    high_bin = int(
        torch.searchsorted(cumulative, torch.tensor(histogram.total - tail, dtype=torch.float64))
    )
    low = max(float(edges[low_bin]), histogram.min)
    high = min(float(edges[min(high_bin + 1, histogram.bins)]), histogram.max)
    return low, high


def _fold_absolute(histogram: Histogram) -> np.ndarray:
    half = histogram.bins // 2
    counts = histogram.counts.numpy()
    return counts[half:] + counts[:half][::-1]


def _kl_divergence(reference: np.ndarray, candidate: np.ndarray) -> float:
    reference = reference / reference.sum()
    candidate = candidate / max(candidate.sum(), 1e-30)
    mask = reference > 0
    candidate = np.where(candidate[mask] > 0, candidate[mask], 1e-12)
    return float(np.sum(reference[mask] * np.log(reference[mask] / candidate)))


def _expand_quantized(clipped: np.ndarray, levels: int) -> np.ndarray:
    """Merge `clipped` into `levels` bins, then spread each back evenly over its non-empty bins."""
    chunk = (np.arange(clipped.size) * levels) // clipped.size
    nonzero = clipped > 0
    sums = np.bincount(chunk, weights=clipped, minlength=levels)
    counts = np.bincount(chunk, weights=nonzero, minlength=levels)
    return np.where(nonzero, sums[chunk] / np.maximum(counts[chunk], 1), 0.0)


def entropy_range(histogram: Histogram, qtype: QType, symmetric: bool) -> Range:
    """TensorRT's threshold search: the |x| clip whose quantized distribution has least KL loss."""
    absolute = _fold_absolute(histogram)
    levels = qtype.symmetric_qmax + 1
    if absolute.sum() == 0 or histogram.limit == 0:
        return histogram.min, histogram.max
    bin_width = histogram.limit / absolute.size
    last_used = int(np.nonzero(absolute)[0].max()) + 1
    best_threshold, best_divergence = last_used, np.inf
    for threshold in range(min(levels, last_used), last_used + 1, max(1, last_used // 256)):
        reference = absolute[:threshold].copy()
        reference[-1] += absolute[threshold:].sum()
        divergence = _kl_divergence(reference, _expand_quantized(absolute[:threshold], levels))
        if divergence < best_divergence:
            best_threshold, best_divergence = threshold, divergence
    clip = best_threshold * bin_width
    return max(histogram.min, -clip), min(histogram.max, clip)


def expected_squared_error(
    histogram: Histogram, low: float, high: float, qtype: QType, symmetric: bool
) -> float:
    """Expected squared quantization error of the histogram's values under the range [low, high].

    Values inside the range carry rounding noise of step²/12 (uniform rounding error); values
    outside are clipped to the nearest representable end, measured from their bin centres.
    """
    scale, zero_point = qparams_from_range(
        torch.tensor(low), torch.tensor(high), qtype, symmetric
    )
    scale = float(scale)
    offset = 0.0 if zero_point is None else float(zero_point)
    qmin, qmax = grid_bounds(qtype, symmetric)
    lowest, highest = (qmin - offset) * scale, (qmax - offset) * scale
    centers = histogram.centers()
    clipped = torch.clamp(centers, lowest, highest)
    inside = (centers >= lowest) & (centers <= highest)
    error = torch.where(inside, torch.full_like(centers, scale**2 / 12), (centers - clipped) ** 2)
    return float((histogram.counts * error).sum() / max(histogram.total, 1.0))


def mse_range(histogram: Histogram, qtype: QType, symmetric: bool, steps: int = 128) -> Range:
    """Shrink the min/max range geometrically and keep the one with least expected squared error."""
    best_range, best_error = (histogram.min, histogram.max), np.inf
    for fraction in np.geomspace(1.0, 1e-3, steps):
        candidate = (histogram.min * fraction, histogram.max * fraction)
        error = expected_squared_error(histogram, *candidate, qtype, symmetric)
        if error < best_error:
            best_range, best_error = candidate, error
    return best_range


CALIBRATORS: dict[str, Callable[..., Range]] = {
    "minmax": minmax_range,
    "moving_average": moving_average_range,
    "percentile": percentile_range,
    "entropy": entropy_range,
    "mse": mse_range,
}


def compute_range(
    histogram: Histogram,
    calibrator: str,
    qtype: QType | str = "uint8",
    symmetric: bool = False,
    **options: float,
) -> Range:
    """Clipping range for one activation tensor by the named calibrator."""
    if histogram.batches == 0:
        raise CalibrationError("no calibration data reached this tensor; check the data")
    try:
        method = CALIBRATORS[calibrator]
    except KeyError:
        raise CalibrationError(
            f"unknown calibrator {calibrator!r}; choose one of {', '.join(CALIBRATORS)}"
        ) from None
    return method(histogram, get_qtype(qtype), symmetric, **options)
