import pytest
import torch
from torch import nn

from lowbit.core.cpu import has_vnni
from lowbit.nn import LayerSpec, QConv2d, QEmbedding, QLinear, kernels
from lowbit.nn.kernels import KERNELS, ROW_BUCKETS, candidate_kernels, run_kernel

# Tolerances, as relative Frobenius error against the dequantize-then-matmul reference:
# int8 GEMM kernels compute the same integers, so only float summation order differs (1e-4);
# fbgemm static requantizes outputs to uint8, so a tie may move one output step (1e-2);
# the bf16-activation kernels round activations to 8 mantissa bits (1e-2).
# dequantized_fp32 skips activation rounding, so it is held to "no less accurate than the reference".
TOLERANCE = {"fbgemm_dynamic": 1e-4, "fbgemm_static": 1e-2, "int8pack_bf16": 1e-2,
             "int4pack_bf16": 1e-2, "reference": 0.0}

SPECS = [
    LayerSpec("dynamic", "int8", "per_channel", True, "uint8"),
    LayerSpec("dynamic", "int8", "per_tensor", True, "uint8"),
    LayerSpec("static", "int8", "per_channel", True, "uint8"),
    LayerSpec("weight_only", "int8", "per_channel", True),
    LayerSpec("weight_only", "int4", "group:128", False),
    LayerSpec("weight_only", "int4", "group:32", True),
    LayerSpec("weight_only", "fp16", "per_tensor", True),
    LayerSpec("weight_only", "bf16", "per_tensor", True),
    LayerSpec("dynamic", "int8", "per_channel", True, "uint8-full"),  # fbgemm only where VNNI is
    LayerSpec("weight_only", "int5", "group:32", True, scale_dtype="float16"),  # GGUF's Q5_0
    LayerSpec("weight_only", "int8", "group:32", True, scale_dtype="float16"),  # GGUF's Q8_0
    LayerSpec("weight_only", "int4", "group:32", False, scale_dtype="float16", zero_point="minimum"),  # Q4_1
]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm().clamp(min=1e-12))


def heavy_tailed(rows: int, features: int) -> torch.Tensor:
    """Activations with a few large outlier channels, like a transformer's."""
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, features, generator=generator)
    x[:, :4] *= 20
    return x


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.scheme}-{s.weight}-{s.granularity}")
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_every_fast_kernel_matches_the_reference(spec, rows):
    torch.manual_seed(0)
    linear = nn.Linear(256, 384)
    module = QLinear.from_float(linear, spec, (-30.0, 30.0), (-20.0, 20.0), choose_kernel=False)
    x = heavy_tailed(rows, 256)
    expected = KERNELS["reference"](module, x)
    for name in candidate_kernels(module):
        actual = KERNELS[name](module, x)
        if name == "dequantized_fp32":
            exact = linear(x).detach()
            assert relative_error(actual, exact) <= relative_error(expected, exact)
        else:
            assert relative_error(actual, expected) <= TOLERANCE[name], name


def test_dynamic_int8_does_not_saturate_on_extreme_inputs():
    """Without VNNI, uint8×int8 pair sums saturate int16; 7-bit activations must prevent it."""
    linear = nn.Linear(512, 64, bias=False)
    with torch.no_grad():
        linear.weight.fill_(1.0)  # every weight quantizes to +127
    module = QLinear.from_float(linear, SPECS[0], choose_kernel=False)
    x = torch.ones(2, 512)
    x[:, 0] = -1e-3  # row minimum just below zero: almost every activation maps to the top code
    fast = KERNELS["fbgemm_dynamic"](module, x)
    assert relative_error(fast, KERNELS["reference"](module, x)) < 1e-4
    assert relative_error(fast, linear(x).detach()) < 1e-2


@pytest.mark.skipif(not has_vnni(), reason="8-bit activations run on fbgemm only with VNNI")
def test_eight_bit_activations_do_not_saturate_with_vnni():
    """With VNNI, fbgemm sums uint8 × int8 in int32: 8-bit activations at the top code and +127
    weights (pair sums of 64,770, far above int16) come out exact."""
    linear = nn.Linear(512, 64, bias=False)
    with torch.no_grad():
        linear.weight.fill_(1.0)
    module = QLinear.from_float(linear, LayerSpec("dynamic", "int8", "per_channel", True, "uint8-full"),
                                choose_kernel=False)
    x = torch.ones(2, 512)
    x[:, 0] = -1e-3
    fast = KERNELS["fbgemm_dynamic"](module, x)
    assert relative_error(fast, KERNELS["reference"](module, x)) < 1e-4
    assert relative_error(fast, linear(x).detach()) < 1e-2


def test_eight_bit_activations_run_the_reference_without_vnni(monkeypatch):
    """A file quantized with 8-bit activations on a VNNI machine, loaded on one without: fbgemm
    would saturate, so it is neither chosen nor kept; the reference runs, with the same numerics."""
    spec = LayerSpec("dynamic", "int8", "per_channel", True, "uint8-full")
    module = QLinear.from_float(nn.Linear(64, 32), spec, choose_kernel=False)
    module.spec = module.spec.with_kernels({str(rows): "fbgemm_dynamic" for rows in ROW_BUCKETS})
    monkeypatch.setattr(kernels, "has_vnni", lambda: False)
    assert "fbgemm_dynamic" not in candidate_kernels(module)
    assert "fbgemm_dynamic" in candidate_kernels(module, this_machine=False)  # a file may name it
    assert module.use_available_kernels() == ["fbgemm_dynamic"]
    assert set(module.spec.kernels.values()) == {"reference"}


def test_dynamic_quantizes_each_row_with_its_own_range():
    linear = nn.Linear(64, 32)
    module = QLinear.from_float(linear, SPECS[0], choose_kernel=False)
    small, large = torch.randn(1, 64) * 1e-3, torch.randn(1, 64) * 1e3
    together = KERNELS["fbgemm_dynamic"](module, torch.cat([small, large]))
    alone = KERNELS["fbgemm_dynamic"](module, small)
    assert torch.allclose(together[:1], alone, rtol=1e-4, atol=1e-6)


def test_kernel_choice_is_recorded_per_row_bucket_and_dispatched():
    module = QLinear.from_float(nn.Linear(128, 256), SPECS[3])
    assert set(module.spec.kernels) == {str(rows) for rows in ROW_BUCKETS}
    assert set(module.spec.kernels.values()) <= set(candidate_kernels(module))
    x = torch.randn(3, 128)
    expected = KERNELS[module.spec.kernels["8"]](module, x)
    assert torch.equal(run_kernel(module, x), expected)


@pytest.mark.parametrize("spec", SPECS[:6], ids=lambda s: f"{s.scheme}-{s.weight}-{s.granularity}")
def test_a_wide_layer_is_timed_on_a_view_of_its_first_outputs(spec):
    module = QLinear.from_float(nn.Linear(128, 96), spec, (-30.0, 30.0), (-20.0, 20.0), choose_kernel=False)
    view = module.first_outputs(32)
    assert view.weight.data_ptr() == module.weight.data_ptr()  # a view: no copy of the weights
    x = heavy_tailed(5, 128)
    assert torch.equal(KERNELS["reference"](view, x), KERNELS["reference"](module, x)[:, :32])


def test_forced_reference_kernel(monkeypatch):
    monkeypatch.setenv("LOWBIT_KERNEL", "reference")
    module = QLinear.from_float(nn.Linear(64, 64), SPECS[0])
    assert set(module.spec.kernels.values()) == {"reference"}


def test_qlinear_keeps_leading_dimensions_and_dtype():
    module = QLinear.from_float(nn.Linear(32, 16), SPECS[0])
    out = module(torch.randn(2, 5, 32))
    assert out.shape == (2, 5, 16) and out.dtype == torch.float32


@pytest.mark.parametrize("spec", [LayerSpec("weight_only", "int8", "per_channel", True),
                                  LayerSpec("weight_only", "int4", "group:32", False),
                                  LayerSpec("weight_only", "int4", "group:32", False, zero_point="minimum")])
def test_qembedding_gathers_exactly_the_dequantized_rows(spec):
    embedding = nn.Embedding(500, 64)
    module = QEmbedding.from_float(embedding, spec)
    ids = torch.randint(0, 500, (3, 11))
    assert torch.equal(module(ids), module.dequantized_weight()[ids])
    assert relative_error(module(ids), embedding(ids).detach()) < (0.01 if spec.weight == "int8" else 0.15)


def test_qembedding_int4_takes_an_eighth_of_the_bytes_plus_scales():
    spec = LayerSpec("weight_only", "int4", "group:32", False)
    module = QEmbedding.from_float(nn.Embedding(1000, 128), spec)
    assert module.weight.numel() == 1000 * 64 and module.weight.dtype == torch.uint8


@pytest.mark.parametrize("scheme", ["weight_only", "static"])
def test_qconv2d_fast_path_matches_the_reference(scheme):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1, groups=2)
    spec = LayerSpec(scheme, "int8", "per_channel", True, "uint8" if scheme == "static" else None)
    module = QConv2d.from_float(conv, spec, (-4.0, 4.0), (-6.0, 6.0))
    x = torch.randn(2, 8, 10, 10)
    assert relative_error(module(x), module.reference(x)) < 1e-2
    assert relative_error(module(x), conv(x).detach()) < 0.05


@pytest.mark.parametrize("spec", [SPECS[0], SPECS[1], SPECS[3]], ids=lambda s: f"{s.scheme}-{s.granularity}")
def test_a_nan_input_gives_nan_outputs_like_a_float_layer_not_an_error(spec):
    """fbgemm refuses a row holding NaN ("min should be less than or equal to max"); the layer
    answers as nn.Linear would, with NaN where the NaN reaches. (The static scheme clamps every
    input to its calibrated grid, NaN included, so it is not checked here.)"""
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    module = QLinear.from_float(linear, spec, (-4.0, 4.0), (-8.0, 8.0))
    x = torch.randn(3, 64)
    x[1, 5] = float("nan")
    with torch.inference_mode():
        y = module(x)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2]]).all()


def test_int8pack_is_not_offered_where_torch_would_crash():
    """`torch._weight_int8pack_mm` segfaults on input widths that are not multiples of 16."""
    import lowbit

    for width, offered in ((40, False), (48, True)):
        quantized = lowbit.quantize(torch.nn.Sequential(torch.nn.Linear(width, 64)), "w8", progress=False)
        assert ("int8pack_bf16" in candidate_kernels(quantized[0])) == offered
        assert quantized(torch.randn(3, width)).shape == (3, 64)
