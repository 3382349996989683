"""Folding before quantizing: batch norm into convolutions, clamping activations into output
grids, one grid per tensor between a quantized module and the convolution reading it."""

import copy
import json

import pytest
import torch
from torch import nn

import lowbit
from lowbit.errors import FormatError
from lowbit.transform.fold import Links, fold_batch_norms, trace_links
from tests.fixtures_models import residual_net


def conv_net() -> nn.Module:
    """Conv-BN-ReLU6, depthwise Conv-BN-ReLU6, pointwise Conv-BN: the MobileNet/EfficientNet block,
    with batch norms far from identity."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
                          nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16),
                          nn.ReLU6(),
                          nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8))
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            module.weight.data.uniform_(0.5, 2)
            module.bias.data.uniform_(-1, 1)
    return model.eval()


def batches():
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(4, 3, 12, 12, generator=generator) for _ in range(3)]


class Branching(nn.Module):
    """A convolution whose output feeds its batch norm and a second reader: nothing may fold."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.norm(y) + y


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.norm(self.conv(x)) if x.sum() > 0 else x


def test_links_name_the_folds_fusions_and_shared_grids():
    links = trace_links(conv_net())
    assert links.batch_norms == {"1": "0", "4": "3", "7": "6"}
    assert links.activations == {"0": (0.0, 6.0), "3": (0.0, 6.0)}
    assert links.producers == {"3": "0", "6": "3"}


def test_folding_keeps_the_float_outputs():
    model = conv_net()
    folded = copy.deepcopy(model)
    fold_batch_norms(folded, trace_links(model).batch_norms)
    assert isinstance(folded[1], nn.Identity) and folded[0].bias is not None
    x = batches()[0]
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-5)


def test_folding_keeps_efficientnets_outputs():
    from lowbit.data import assets

    model = assets.efficientnet_lite0()
    links = trace_links(model)
    assert len(links.batch_norms) == 49 and len(links.activations) == 33
    folded = copy.deepcopy(model)
    fold_batch_norms(folded, links.batch_norms)
    photos = assets.sample_photos()[:4]
    with torch.no_grad():
        assert torch.allclose(folded(photos), model(photos), atol=1e-4)


def test_a_norm_whose_convolution_has_another_reader_is_not_folded():
    assert trace_links(Branching()).batch_norms == {}


def test_a_model_fx_cannot_trace_folds_nothing():
    assert trace_links(DataDependent()) == Links()


def test_static_grids_after_folding():
    quantized = lowbit.quantize(conv_net(), "w8a8-static", calibration=batches(), progress=False)
    first, depthwise = quantized[0], quantized[3]
    low = -int(first.output_zero_point) * float(first.output_scale)
    high = low + 255 * float(first.output_scale)
    assert low == 0 and high <= 6.0 + 1e-5  # ReLU6 fused: no level spent outside [0, 6]
    assert float(depthwise.input_scale) == float(first.output_scale)  # one grid for the tensor
    assert int(depthwise.input_zero_point) == int(first.output_zero_point)
    assert all(quantized[i].spec.activation == "uint8-full" for i in (0, 3, 6))


def test_a_folded_model_saves_reloads_and_calibrates_alike(tmp_path):
    model = conv_net()
    quantized = lowbit.quantize(model, "w8a8-static", calibration=batches(), progress=False)
    folder = lowbit.save(quantized, tmp_path / "m", runtime="torch")
    manifest = json.loads((folder / "lowbit.json").read_text())
    assert manifest["folded"] == {"1": "0", "4": "3", "7": "6"}
    assert manifest["fused"] == {"0": [0.0, 6.0], "3": [0.0, 6.0]}  # ReLU6s in the output grids
    x = batches()[0]
    with torch.no_grad():
        expected = quantized(x)
        assert torch.equal(lowbit.load(folder, skeleton=conv_net())(x), expected)
        calibration = lowbit.calibrate(model, batches(), progress=False)
        path = calibration.save(tmp_path / "calibration.safetensors")
        from lowbit.formats.calibration import load_calibration

        for result in (calibration, load_calibration(path, model)):
            again = lowbit.quantize(model, "w8a8-static", calibration=result, progress=False)
            assert torch.equal(again(x), expected)


def test_a_linear_and_its_relu_share_one_output_grid_recorded_in_lowbit_json(tmp_path):
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    data = [torch.randn(8, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    quantized = lowbit.quantize(model, "w8a8-static", calibration=data, progress=False)
    assert int(quantized[0].output_zero_point) == 0  # no level spent below ReLU's 0
    folder = lowbit.save(quantized, tmp_path / "m", runtime="torch")
    assert json.loads((folder / "lowbit.json").read_text())["fused"] == {"0": [0.0, None]}
    prepared = lowbit.qat.prepare(model, "w8a8-static", calibration=data, progress=False)
    assert lowbit.qat.convert(prepared, progress=False).lowbit_fused == {"0": [0.0, None]}


def test_a_folded_record_the_model_lacks_is_refused(tmp_path):
    from tests.formats.attacker import edit_manifest

    quantized = lowbit.quantize(conv_net(), "w8a8-static", calibration=batches(), progress=False)
    folder = lowbit.save(quantized, tmp_path / "m", runtime="torch")
    edit_manifest(folder, lambda manifest: manifest["folded"].update({"2": "0"}))  # "2" is a ReLU6
    with pytest.raises(FormatError, match="no such pair"):
        lowbit.load(folder, skeleton=conv_net())


def residual_batches():
    return [torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(seed)) for seed in range(3)]


def test_a_residual_sum_read_by_a_convolution_is_rounded_once_on_its_grid(tmp_path):
    calibration = residual_batches()
    quantized = lowbit.quantize(residual_net(), "w8a8-static", calibration=calibration, progress=False)
    assert set(quantized.lowbit_roundings) == {"2", "3"}  # the block outputs that convolutions read
    scale, zero_point = quantized.lowbit_roundings["2"]
    reader = quantized[3].expand
    assert (float(reader.input_scale), int(reader.input_zero_point)) == (scale, zero_point)
    x = calibration[0]
    with torch.no_grad():
        block_output = quantized[2](quantized[1](quantized[0](x)))
        steps = block_output / scale + zero_point
        assert torch.allclose(steps, steps.round(), atol=1e-3)  # the skip path reads the rounded sum too
        folder = lowbit.save(quantized, tmp_path / "m", runtime="torch")
        assert torch.equal(lowbit.load(folder, skeleton=residual_net())(x), quantized(x))


@pytest.mark.parametrize("roundings", [{"2": {"scale": -1.0, "zero_point": 3}},
                                       {"9": {"scale": 0.1, "zero_point": 3}},
                                       {"2": {"scale": 0.1, "zero_point": 300}}])
def test_a_rounding_the_model_cannot_take_is_refused(tmp_path, roundings):
    from tests.formats.attacker import edit_manifest

    quantized = lowbit.quantize(residual_net(), "w8a8-static", calibration=residual_batches(), progress=False)
    folder = lowbit.save(quantized, tmp_path / "m", runtime="torch")
    edit_manifest(folder, lambda manifest: manifest.update(roundings=roundings))
    with pytest.raises(FormatError):
        lowbit.load(folder, skeleton=residual_net())


def test_norms_without_gain_fold_and_norms_without_running_statistics_do_not():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, affine=False), nn.Conv2d(4, 4, 1),
                          nn.BatchNorm2d(4, track_running_stats=False)).eval()
    model[1].running_mean.uniform_(-1, 1)
    links = trace_links(model)
    assert links.batch_norms == {"1": "0"}
    folded = copy.deepcopy(model)
    fold_batch_norms(folded, links.batch_norms)
    x = batches()[0]
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-5)
