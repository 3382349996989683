"""CalibrationResult: one histogram pass, every calibrator scored, update, save and reload."""

import pytest
import torch
from torch import nn

import lowbit
from lowbit.core import CALIBRATORS, Histogram, compute_range
from lowbit.core.calibrators import expected_squared_error
from lowbit.errors import CalibrationError, FormatError
from lowbit.formats.calibration import load_calibration
from lowbit.transform.calibrate import SIDE_QTYPES, CalibrationResult, best_range, calibrate


def test_calibrate_records_every_linear_input_and_output(mlp, mlp_batches):
    result = calibrate(mlp, mlp_batches, progress=False)
    assert set(result.histograms) == {"0", "2"}
    ranges = result.ranges("minmax")
    assert ranges["0"]["input"][0] <= ranges["0"]["input"][1] and ranges["0"]["input_shape"][-1] == 64


def test_auto_picks_the_calibrator_with_least_expected_error_for_each_tensor():
    torch.manual_seed(0)
    outliers, gaussian = Histogram(), Histogram()
    outliers.update(torch.cat([torch.randn(20000), torch.tensor([80.0, -75.0])]))
    gaussian.update(torch.rand(20000))
    for histogram in (outliers, gaussian):
        name, (low, high) = best_range(histogram, SIDE_QTYPES["input"])
        best = expected_squared_error(histogram, low, high, SIDE_QTYPES["input"], False)
        for other in CALIBRATORS:
            other_range = compute_range(histogram, other, "uint8", False)
            assert best <= expected_squared_error(histogram, *other_range, SIDE_QTYPES["input"], False)
    assert best_range(outliers, SIDE_QTYPES["input"])[0] != "minmax"  # clipping the outliers pays


def test_quantize_with_a_calibration_result_equals_calibrating_inline(mlp, mlp_batches):
    result = calibrate(mlp, mlp_batches, progress=False)
    inline = lowbit.quantize(mlp, "w8a8-static", calibration=mlp_batches, progress=False)
    shared = lowbit.quantize(mlp, "w8a8-static", calibration=result, progress=False)
    x = torch.randn(5, 64)
    with torch.inference_mode():
        assert torch.equal(inline(x), shared(x))


def test_auto_calibrator_recipe_quantizes(mlp, mlp_batches):
    result = calibrate(mlp, mlp_batches, progress=False)
    model = lowbit.quantize(mlp, lowbit.make_recipe("w8a8-static", calibrator="auto"), calibration=result,
                            progress=False)
    x = mlp_batches[0]
    assert (model(x) - mlp(x)).norm() / mlp(x).norm() < 0.1


def test_save_and_load_give_the_same_ranges(mlp, mlp_batches, tmp_path):
    result = calibrate(mlp, mlp_batches, progress=False)
    loaded = load_calibration(result.save(tmp_path / "calibration.safetensors"))
    assert loaded.ranges("entropy") == result.ranges("entropy")
    assert loaded.best_calibrators() == result.best_calibrators()
    with pytest.raises(CalibrationError, match="load_calibration"):
        loaded.update(mlp_batches, progress=False)


def test_update_adds_the_new_batches_to_the_same_histograms(mlp, mlp_batches):
    result = calibrate(mlp, mlp_batches[:2], progress=False)
    once = result.histograms["0"]["input"].total
    result.update([batch * 3 for batch in mlp_batches[:2]], progress=False)
    histogram = result.histograms["0"]["input"]
    assert histogram.total == pytest.approx(2 * once) and histogram.batches == 4
    assert histogram.max == pytest.approx(float(max((b * 3).max() for b in mlp_batches[:2])))


def test_a_missing_module_or_a_foreign_file_is_a_clear_error(mlp, mlp_batches, tmp_path):
    result = calibrate(mlp, mlp_batches, names=["0"], progress=False)
    with pytest.raises(CalibrationError, match="no data for 2"):
        lowbit.quantize(mlp, "w8a8-static", calibration=result, progress=False)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(FormatError):
        load_calibration(tmp_path / "junk.safetensors")
    assert isinstance(result, CalibrationResult)


def test_merging_histograms_of_zeros_keeps_them_in_the_middle_bin():
    from lowbit.transform.calibrate import merge_histograms

    zeros, more_zeros = Histogram(), Histogram()
    zeros.update(torch.zeros(10))
    more_zeros.update(torch.zeros(6))
    merged = merge_histograms(zeros, more_zeros)
    assert merged.total == 16 and merged.counts[merged.bins // 2] == 16 and merged.batches == 2


def test_calibrate_covers_the_static_same_padding_convolutions_quantize_replaces():
    from tests.fixtures_models import same_padding_cnn

    model = same_padding_cnn().eval()
    images = [torch.randn(2, 3, 8, 8) for _ in range(2)]
    result = calibrate(model, images, progress=False)
    quantized = lowbit.quantize(model, "w8a8-static", calibration=result, progress=False)
    static = [name for name, module in quantized.named_modules() if getattr(module, "spec", None)
              and module.spec.scheme == "static"]
    assert static and set(static) <= set(result.histograms)


@pytest.mark.parametrize(("model", "returned"), [
    (nn.Sequential(nn.Linear(64, 12), nn.ReLU(), nn.Linear(12, 6)), ["2"]),
    (nn.Sequential(nn.Linear(64, 12), nn.Unflatten(1, (3, 4))), ["0"]),  # a view of its output
    (nn.Sequential(nn.Linear(64, 12), nn.Softmax(-1)), []),  # read by another operation
])
def test_calibration_finds_the_modules_whose_output_the_model_returns(model, returned, mlp_batches,
                                                                     tmp_path):
    result = calibrate(model.eval(), mlp_batches, progress=False)
    assert result.outputs == returned
    assert load_calibration(result.save(tmp_path / "calibration.safetensors")).outputs == returned
