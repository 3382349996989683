import math

import pytest
import torch

from lowbit.core import CALIBRATORS, Histogram, compute_range
from lowbit.core.calibrators import expected_squared_error
from lowbit.core.qtypes import UINT8
from lowbit.errors import CalibrationError


def test_histogram_memory_is_bounded_and_counts_every_value():
    histogram = Histogram()
    for scale in (0.1, 1.0, 10.0, 1000.0):
        histogram.update(torch.randn(10_000) * scale)
    assert histogram.counts.numel() == 2048
    assert histogram.total == pytest.approx(40_000)
    assert histogram.limit >= histogram.max


def test_growing_the_range_merges_bins_exactly():
    grown, direct = Histogram(64), Histogram(64)
    values = torch.tensor([-0.9, -0.1, 0.0, 0.3, 0.8])
    grown.update(values)
    grown.update(torch.tensor([3.9]))
    direct.limit = grown.limit
    direct.update(torch.cat([values, torch.tensor([3.9])]))
    assert torch.equal(grown.counts, direct.counts)


def test_zeros_then_data_keeps_the_zeros():
    histogram = Histogram(64)
    histogram.update(torch.zeros(10))
    histogram.update(torch.tensor([1.0, -1.0]))
    assert histogram.total == 12
    assert histogram.counts[32] >= 10


def test_minmax_is_the_exact_range():
    histogram = Histogram()
    histogram.update(torch.tensor([-2.0, 0.5, 7.0]))
    assert compute_range(histogram, "minmax") == (-2.0, 7.0)


def test_moving_average_damps_one_outlier_batch():
    histogram = Histogram()
    for _ in range(20):
        histogram.update(torch.linspace(-1, 1, 100))
    histogram.update(torch.tensor([-1.0, 100.0]))
    low, high = compute_range(histogram, "moving_average")
    assert high < 3.0 and low == pytest.approx(-1.0, abs=0.05)


@pytest.mark.parametrize("calibrator", ["percentile", "entropy"])
def test_clipping_calibrators_ignore_rare_outliers(calibrator):
    torch.manual_seed(0)
    histogram = Histogram()
    data = torch.randn(200_000)
    data[:3] = torch.tensor([60.0, -55.0, 70.0])
    histogram.update(data)
    low, high = compute_range(histogram, calibrator)
    assert 2.0 < high < 30.0 and -30.0 < low < -2.0


def test_mse_clips_heavy_tails_and_has_no_more_error_than_minmax():
    torch.manual_seed(0)
    histogram = Histogram()
    histogram.update(torch.randn(100_000) ** 3)
    error = {name: expected_squared_error(histogram, *compute_range(histogram, name), UINT8, False)
             for name in ("minmax", "mse")}
    assert error["mse"] < error["minmax"]
    assert compute_range(histogram, "mse")[1] < histogram.max


def test_all_calibrators_score_from_one_histogram():
    histogram = Histogram()
    histogram.update(torch.randn(5_000))
    ranges = {name: compute_range(histogram, name) for name in CALIBRATORS}
    assert all(math.isfinite(lo) and math.isfinite(hi) and lo <= 0 <= hi for lo, hi in ranges.values())


def test_calibrating_without_data_is_an_error():
    with pytest.raises(CalibrationError, match="no calibration data"):
        compute_range(Histogram(), "minmax")


def test_unknown_calibrator_is_an_error():
    histogram = Histogram()
    histogram.update(torch.randn(10))
    with pytest.raises(CalibrationError, match="unknown calibrator"):
        compute_range(histogram, "magic")


def test_nan_activations_are_an_error():
    with pytest.raises(CalibrationError, match="NaN"):
        Histogram().update(torch.tensor([1.0, float("nan")]))


def test_histogram_state_round_trips():
    histogram = Histogram()
    histogram.update(torch.randn(1000))
    restored = Histogram.from_state_dict(histogram.state_dict())
    assert torch.equal(restored.counts, histogram.counts)
    assert (restored.min, restored.max, restored.batches) == (histogram.min, histogram.max, 1)
