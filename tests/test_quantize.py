import pytest
import torch
from torch import nn

import lowbit
from lowbit import CalibrationError, QuantizationError
from lowbit.nn import QConv2d, QEmbedding, QLinear
from lowbit.transform.quantize import quantized_modules
from tests.fixtures_models import tied_lm, tiny_cnn


def test_quantize_returns_a_copy_and_leaves_the_input_untouched(mlp):
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    quantized = lowbit.quantize(mlp, "w8a8-dynamic")
    assert quantized is not mlp
    assert all(isinstance(m, nn.Linear) for m in (mlp[0], mlp[2]))
    assert all(torch.equal(before[k], v) for k, v in mlp.state_dict().items())
    assert isinstance(quantized[0], QLinear)


def test_inplace_quantizes_the_model_itself(mlp):
    assert lowbit.quantize(mlp, "w8", inplace=True) is mlp
    assert isinstance(mlp[0], QLinear)


@pytest.mark.parametrize("recipe", ["w8a8-dynamic", "w8", "w4-g32", "fp16", "bf16", "q8_0", "q5_0", "q4_0"])
def test_quantized_outputs_stay_close_to_float(mlp, recipe):
    x = torch.randn(16, 64)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64)).eval()
    quantized = lowbit.quantize(model, recipe)
    error = (quantized(x) - model(x)).norm() / model(x).norm()
    assert error < (0.1 if recipe.startswith(("w4", "q4", "q5")) else 0.02)


def test_static_quantization_calibrates_and_runs(mlp, mlp_batches):
    quantized = lowbit.quantize(mlp, "w8a8-static", calibration=mlp_batches, progress=False)
    module = quantized[0]
    assert module.spec.scheme == "static" and float(module.input_scale) > 0
    x = mlp_batches[0]
    assert (quantized(x) - mlp(x)).norm() / mlp(x).norm() < 0.05


def test_skip_keeps_matching_modules_in_float(mlp):
    quantized = lowbit.quantize(mlp, "w8", skip=["2"])
    assert isinstance(quantized[0], QLinear) and isinstance(quantized[2], nn.Linear)


def test_overrides_mix_precisions_by_name(mlp):
    quantized = lowbit.quantize(mlp, "w8a8-dynamic", overrides={"2": "w4-g32"})
    assert quantized[0].spec.scheme == "dynamic" and quantized[2].spec.weight == "int4"


def test_convolutions_and_embeddings_are_quantized():
    cnn = lowbit.quantize(tiny_cnn().eval(), "w8")
    assert sum(isinstance(m, QConv2d) for m in cnn.modules()) == 2
    lm = lowbit.quantize(tied_lm().eval(), "w8")
    assert isinstance(lm.embed, QEmbedding) and isinstance(lm.head, QLinear)


def test_static_without_calibration_says_what_to_do(mlp):
    with pytest.raises(QuantizationError, match="calibration"):
        lowbit.quantize(mlp, "w8a8-static")


def test_empty_calibration_is_an_error(mlp):
    with pytest.raises(CalibrationError, match="empty"):
        lowbit.quantize(mlp, "w8a8-static", calibration=[], progress=False)


def test_wrongly_shaped_calibration_is_an_error(mlp):
    with pytest.raises(CalibrationError, match="batch 0"):
        lowbit.quantize(mlp, "w8a8-static", calibration=[torch.randn(4, 63)], progress=False)


def test_nan_weights_are_refused_and_the_model_untouched(mlp):
    with torch.no_grad():
        mlp[0].weight[0, 0] = float("inf")
    with pytest.raises(QuantizationError, match="NaN or Inf"):
        lowbit.quantize(mlp, "w8")
    assert isinstance(mlp[0], nn.Linear)


def test_group_size_that_does_not_divide_names_the_module():
    model = nn.Sequential(nn.Linear(40, 32))  # no supported group (32 and up) divides 40
    with pytest.raises(QuantizationError, match="'0'"):
        lowbit.quantize(model, "w4")


def test_nothing_to_quantize_is_an_error():
    with pytest.raises(QuantizationError, match="nothing to quantize"):
        lowbit.quantize(nn.Sequential(nn.ReLU()), "w8")


def test_not_a_module_is_an_error():
    with pytest.raises(QuantizationError, match="nn.Module"):
        lowbit.quantize("model.bin", "w8")


def test_quantized_model_records_recipe_and_source(mlp):
    quantized = lowbit.quantize(mlp, "w8")
    assert quantized.lowbit_recipe.weights == "int8"
    assert quantized.lowbit_source["parameters"] == sum(p.numel() for p in mlp.parameters())
    assert len(quantized_modules(quantized)) == 2


@pytest.mark.parametrize("recipe, kernel", [("w8a8-dynamic", "fbgemm_dynamic"),
                                            ("w8", "int8pack_bf16"), ("w4-g32", "int4pack_bf16")])
def test_model_served_under_inference_mode_still_runs_with_autograd_on(monkeypatch, recipe, kernel):
    monkeypatch.setenv("LOWBIT_KERNEL", kernel)
    model = nn.Sequential(nn.LayerNorm(64), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64)).eval()
    quantized = lowbit.quantize(model, recipe)
    x = torch.randn(3, 64)
    with torch.inference_mode():
        served = quantized(x)
    assert torch.equal(quantized(x).detach(), served)


def test_static_same_padding_convolutions_are_quantized_with_their_padding(tmp_path):
    from tests.fixtures_models import same_padding_cnn

    model = same_padding_cnn().eval()
    x = torch.randn(2, 3, 8, 8)
    quantized = lowbit.quantize(model, "w8")
    assert isinstance(quantized[0], QConv2d)
    assert (quantized(x) - model(x)).norm() / model(x).norm() < 0.02
    reloaded = lowbit.load(lowbit.save(quantized, tmp_path / "m"), skeleton=same_padding_cnn)
    assert torch.equal(reloaded(x), quantized(x))


def test_other_subclasses_of_supported_modules_are_kept_in_float():
    class ScaledLinear(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(ScaledLinear(32, 32), nn.Linear(32, 32))
    quantized = lowbit.quantize(model, "w8")
    assert type(quantized[0]) is ScaledLinear and isinstance(quantized[1], QLinear)


def test_fallback_recipe_takes_the_modules_the_recipe_cannot_quantize():
    model = nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 8)).eval()  # no group divides 40
    with pytest.raises(QuantizationError, match="fallback="):
        lowbit.quantize(model, lowbit.make_recipe("w4", granularity="group:64"), progress=False)
    with pytest.warns(lowbit.LowbitWarning, match="fallback"):
        quantized = lowbit.quantize(model, lowbit.make_recipe("w4", granularity="group:64"), fallback="w8",
                                    progress=False)
    assert quantized[0].spec.weight == "int8" and quantized[2].spec.weight == "int4"


def test_a_missing_kernel_falls_back_with_a_warning_instead_of_crashing(mlp, monkeypatch):
    from lowbit.nn import kernels

    monkeypatch.setattr(kernels, "fbgemm_available", lambda: False)
    with pytest.warns(lowbit.LowbitWarning, match="reference kernel"):
        slow = lowbit.quantize(mlp, "w8a8-dynamic", progress=False)
    assert set(slow[0].spec.kernels.values()) <= {"reference", "dequantized_fp32"}
    with pytest.warns(lowbit.LowbitWarning, match="fallback"):
        weight_only = lowbit.quantize(mlp, "w8a8-dynamic", fallback="w8", progress=False)
    assert weight_only[0].spec.scheme == "weight_only"
    assert issubclass(lowbit.HardwareCompatibilityError, lowbit.QuantizationError)


def test_a_group_that_does_not_divide_adapts_to_the_largest_that_does():
    """SmolLM2's hidden size 576 is not a multiple of 128: a g128 request takes groups of 64 there
    and 128 where it divides, with one warning, and never fails."""
    import warnings

    model = nn.Sequential(nn.Linear(576, 256), nn.Linear(256, 96), nn.Linear(96, 4)).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantized = lowbit.quantize(model, "w4", progress=False)
    groups = [module.spec.granularity for module in quantized]
    assert groups == ["group:64", "group:128", "group:32"]
    adapted = [str(warning.message) for warning in caught if "does not divide" in str(warning.message)]
    assert len(adapted) == 1 and "group:64 for 1 (0)" in adapted[0] and "group:32 for 1 (2)" in adapted[0]
    x = torch.randn(3, 576)
    with torch.no_grad():
        assert torch.nn.functional.cosine_similarity(quantized(x), model(x)).min() > 0.99
    with pytest.raises(QuantizationError, match="does not divide the input dimension 8"):
        lowbit.quantize(nn.Sequential(nn.Linear(8, 4)), "w4", progress=False)  # no group divides 8


def test_a_static_linear_whose_output_the_model_returns_leaves_it_float(mlp, mlp_batches, tmp_path):
    """Nothing reads the model's output on an int8 grid: rounding it only clips and ties logits.
    The last Linear's kernel gives the int32 sums times the scales, as the reference computes."""
    from lowbit.nn import kernels
    from lowbit.transform.calibrate import calibrate

    quantized = lowbit.quantize(mlp, "w8a8-static", calibration=mlp_batches, progress=False)
    assert (quantized[0].spec.output, quantized[2].spec.output) == ("uint8", "float")
    rounding_all = calibrate(mlp, mlp_batches, progress=False)
    rounding_all.outputs = []  # what a calibration file written before this knew: every output rounded
    rounded = lowbit.quantize(mlp, "w8a8-static", calibration=rounding_all, progress=False)
    assert rounded[2].spec.output == "uint8"
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        hidden = quantized[1](quantized[0](x))
        reference = kernels.reference(quantized[2], hidden)
        assert torch.allclose(kernels.fbgemm_static(quantized[2], hidden), reference, atol=1e-4)
        assert torch.allclose(quantized(x), reference, atol=1e-4)
        assert len(reference.unique()) > 256  # on no 8-bit grid
        error, rounded_error = ((model(x) - mlp(x)).norm() for model in (quantized, rounded))
    assert error < rounded_error
    loaded = lowbit.load(lowbit.save(quantized, tmp_path / "m", runtime="torch"), skeleton=mlp)
    assert loaded[2].spec.output == "float"
    with torch.inference_mode():
        assert torch.equal(loaded(x), quantized(x))


def test_only_a_static_linear_may_leave_its_output_float():
    from lowbit.nn.spec import LayerSpec

    assert LayerSpec("static", "int8", "per_channel", True, output="float").problem("linear", (4, 4)) is None
    for scheme, kind in (("weight_only", "linear"), ("dynamic", "linear"), ("static", "conv")):
        problem = LayerSpec(scheme, "int8", "per_channel", True, output="float").problem(kind, (4, 4, 1, 1))
        assert "only a static Linear's output may be float" in problem
    written_before = {"scheme": "static", "weight": "int8", "granularity": "per_channel", "symmetric": True}
    assert LayerSpec.from_dict(written_before).output == "uint8"  # files from before the field
