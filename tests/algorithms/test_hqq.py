"""HQQ (lowbit.algorithms.hqq): float zero points with lower error than round-to-nearest on the
same grid, with and without a planted outlier channel, stored and run as floats in every runtime."""

from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.algorithms.hqq import hqq
from lowbit.formats.lowbit_format import read_manifest
from lowbit.nn.qweight import round_to_nearest
from lowbit.nn.spec import LayerSpec
from tests.fixtures_models import tiny_llama

SPEC = LayerSpec("weight_only", "int4", "group:32", False, zero_point="float")


def _weight(outlier: bool) -> torch.Tensor:
    """A weight (one input channel 20x the others when `outlier`)."""
    weight = torch.randn(96, 256, generator=torch.Generator().manual_seed(0)) * 0.02
    if outlier:
        weight[:, 7] *= 20
    return weight


@pytest.mark.parametrize("outlier", [False, True], ids=["plain", "outlier-channel"])
def test_hqq_beats_round_to_nearest_on_weights_and_outputs(outlier):
    weight = _weight(outlier)
    inputs = torch.randn(512, 256, generator=torch.Generator().manual_seed(1))
    errors = {}
    for name, rounding in (("rtn", round_to_nearest), ("hqq", hqq)):
        rounded = rounding(weight, SPEC)
        difference = weight - rounded.dequantize()
        errors[name] = (float(difference.abs().pow(0.7).mean()), float(((inputs @ difference.T) ** 2).mean()))
    assert errors["hqq"][0] < 0.97 * errors["rtn"][0]  # the lp error HQQ minimises
    assert errors["hqq"][1] < errors["rtn"][1]  # and what a layer outputs


def test_zero_points_are_floats_off_the_grid_and_the_codes_are_on_it():
    rounded = hqq(_weight(False), SPEC)
    assert rounded.zero_point.dtype == torch.float32
    assert not torch.equal(rounded.zero_point, rounded.zero_point.round())
    assert int(rounded.data.min()) >= 0 and int(rounded.data.max()) <= 15
    # the codes are round(w / s + z), clamped: what dequantizing reads back
    codes = torch.round(_weight(False).reshape(-1, 32) / rounded.scale.reshape(-1, 1)
                        + rounded.zero_point.reshape(-1, 1)).clamp(0, 15)
    assert torch.equal(rounded.data.reshape(-1, 32).float(), codes)


def test_grids_without_a_zero_point_to_optimise_are_rounded_to_nearest():
    weight = _weight(False)
    for spec in (LayerSpec("weight_only", "int4", "group:32", True),
                 LayerSpec("weight_only", "int8", "per_channel", True)):
        assert torch.equal(hqq(weight, spec).data, round_to_nearest(weight, spec).data)
    assert LayerSpec("weight_only", "int8", "per_channel", True, zero_point="float").problem(
        "linear", (4, 32)) is not None


def test_w4_hqq_model_stores_float_zero_points_and_reloads_bit_identical(tmp_path):
    model = tiny_llama()
    quantized = lowbit.quantize(model, "w4-hqq", progress=False)
    projection = quantized.model.layers[0].mlp.up_proj
    assert projection.weight_zero_point.dtype == torch.float32
    folder = lowbit.save(quantized, tmp_path / "hqq", runtime="torch")
    assert read_manifest(folder)["modules"]["model.layers.0.mlp.up_proj"]["spec"]["zero_point"] == "float"
    reloaded = lowbit.load(folder)
    ids = torch.randint(0, 64, (2, 9))
    with torch.inference_mode():
        assert torch.equal(quantized(ids).logits, reloaded(ids).logits)


def test_onnx_runtime_runs_float_zero_points_as_lowbit_does(tmp_path):
    quantized = lowbit.quantize(tiny_llama(), "w4-hqq", progress=False)
    for module in quantized.modules():  # compare with the exact reference kernel, not bf16 ones
        if hasattr(module, "kernel_cache") and hasattr(module, "spec"):
            module.spec = module.spec.with_kernels({"all": "reference"})
            module.kernel_cache.clear()
    served = lowbit.load(lowbit.save(quantized, tmp_path / "ort", runtime="onnxruntime"))
    ids = torch.randint(0, 64, (2, 9))
    with torch.inference_mode():
        torch.testing.assert_close(served(ids).logits, quantized(ids).logits, atol=1e-5, rtol=0)
