"""One bounded histogram per activation tensor, shared by every calibrator.

The range is symmetric, [-limit, limit], with a fixed number of bins. When a batch exceeds the
range, the limit doubles and adjacent bins merge pairwise, which is exact, so memory stays fixed
however much calibration data flows through.
"""

from __future__ import annotations

import math

import torch

from lowbit.errors import CalibrationError

DEFAULT_BINS = 2048
MOVING_AVERAGE_CONSTANT = 0.01


class Histogram:
    """Counts of values in equal-width bins over [-limit, limit], plus exact and averaged ranges."""

    def __init__(self, bins: int = DEFAULT_BINS) -> None:
        if bins % 4 or bins < 16:
            raise CalibrationError("a histogram needs a multiple of 4 bins, at least 16")
        self.counts = torch.zeros(bins, dtype=torch.float64)
        self.limit = 0.0
        self.min = math.inf
        self.max = -math.inf
        self.average_min = 0.0
        self.average_max = 0.0
        self.batches = 0

    @property
    def bins(self) -> int:
        return self.counts.numel()

    @property
    def total(self) -> float:
        return float(self.counts.sum())

    def update(self, x: torch.Tensor) -> None:
        """Add the values of one batch."""
        values = x.detach().float().reshape(-1)
        if values.numel() == 0:
            return
        if not bool(torch.isfinite(values).all()):
            raise CalibrationError("calibration activations contain NaN or Inf")
        batch_min, batch_max = float(values.min()), float(values.max())
        self._update_ranges(batch_min, batch_max)
        self._grow_to(max(abs(batch_min), abs(batch_max)))
        if self.limit > 0:
            self.counts += torch.histc(values, self.bins, -self.limit, self.limit).double()
        else:
            self.counts[self.bins // 2] += values.numel()

    def _update_ranges(self, batch_min: float, batch_max: float) -> None:
        if self.batches == 0:
            self.average_min, self.average_max = batch_min, batch_max
        else:
            c = MOVING_AVERAGE_CONSTANT
            self.average_min += c * (batch_min - self.average_min)
            self.average_max += c * (batch_max - self.average_max)
        self.min, self.max = min(self.min, batch_min), max(self.max, batch_max)
        self.batches += 1

    def _grow_to(self, amax: float) -> None:
        if amax <= self.limit:
            return
        if self.limit == 0:
            if self.total > 0:  # only zeros seen so far: they sit in the middle bin
                zeros = self.total
                self.counts.zero_()
                self.limit = amax
                self.counts[self.bins // 2] = zeros
            self.limit = amax
            return
        while self.limit < amax:
            half = self.bins // 2
            merged = self.counts.reshape(-1, 2).sum(dim=1)
            self.counts = torch.zeros_like(self.counts)
            self.counts[half // 2 : half // 2 + half] = merged
            self.limit *= 2

    def edges(self) -> torch.Tensor:
        return torch.linspace(-self.limit, self.limit, self.bins + 1, dtype=torch.float64)

    def centers(self) -> torch.Tensor:
        edges = self.edges()
        return (edges[:-1] + edges[1:]) / 2

    def state_dict(self) -> dict[str, torch.Tensor]:
        ranges = [self.limit, self.min, self.max, self.average_min, self.average_max, self.batches]
        return {"counts": self.counts.clone(), "ranges": torch.tensor(ranges, dtype=torch.float64)}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> Histogram:
        histogram = cls(state["counts"].numel())
        histogram.counts = state["counts"].double().clone()
        limit, lo, hi, avg_lo, avg_hi, batches = state["ranges"].tolist()
        histogram.limit, histogram.min, histogram.max = limit, lo, hi
        histogram.average_min, histogram.average_max = avg_lo, avg_hi
        histogram.batches = int(batches)
        return histogram
