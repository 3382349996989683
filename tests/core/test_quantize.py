import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from lowbit.core import (
    Granularity,
    compute_qparams,
    get_qtype,
    pack_int4,
    quantize_tensor,
    unpack_int4,
)
from lowbit.core.quantize import to_blocks
from lowbit.errors import InvalidRecipeError, QuantizationError

INTEGER_TYPES = ["int8", "uint8", "int4", "uint4"]
finite = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)


def matrices():
    return st.tuples(st.integers(1, 6), st.integers(1, 3)).flatmap(
        lambda shape: arrays("float32", (shape[0], 32 * shape[1]), elements=finite)
    )


@settings(max_examples=60, deadline=None)
@given(
    matrices(),
    st.sampled_from(INTEGER_TYPES),
    st.sampled_from(["per_tensor", "per_channel", "per_channel:1", "group:32"]),
    st.booleans(),
)
def test_round_trip_error_is_at_most_half_a_step(array, qtype, granularity, symmetric):
    x = torch.from_numpy(array)
    quantized = quantize_tensor(x, qtype, granularity, symmetric)
    error = to_blocks((quantized.dequantize() - x).abs(), quantized.granularity)
    half_step = quantized.scale.reshape(-1, 1).abs() / 2  # a symmetric int4 scale may be negative
    assert bool((error <= half_step * (1 + 1e-5) + 1e-6).all())


@settings(max_examples=60, deadline=None)
@given(matrices(), st.sampled_from(INTEGER_TYPES), st.sampled_from(["per_tensor", "group:32"]))
def test_zero_is_exactly_representable_in_asymmetric_mode(array, qtype, granularity):
    x = torch.from_numpy(array)
    x[0, 0] = 0.0
    quantized = quantize_tensor(x, qtype, granularity, symmetric=False)
    assert quantized.dequantize()[0, 0].item() == 0.0


@settings(max_examples=60, deadline=None)
@given(matrices(), st.sampled_from(INTEGER_TYPES + ["fp16", "bf16"]), st.booleans())
def test_finite_input_never_yields_nan_or_inf(array, qtype, symmetric):
    x = torch.from_numpy(array)
    restored = quantize_tensor(x, qtype, "per_channel", symmetric).dequantize()
    assert bool(torch.isfinite(restored).all())


@pytest.mark.parametrize("qtype", INTEGER_TYPES)
@pytest.mark.parametrize("symmetric", [True, False])
def test_all_zero_and_constant_tensors_round_trip(qtype, symmetric):
    zeros = torch.zeros(4, 64)
    assert torch.equal(quantize_tensor(zeros, qtype, "group:32", symmetric).dequantize(), zeros)
    constant = torch.full((4, 64), -3.5)
    restored = quantize_tensor(constant, qtype, "per_channel", symmetric).dequantize()
    assert torch.allclose(restored, constant, rtol=1e-6)


def test_values_stay_inside_the_type_range():
    x = torch.randn(16, 256) * 100
    for name in INTEGER_TYPES:
        qtype = get_qtype(name)
        data = quantize_tensor(x, qtype, "group:64", symmetric=False).data
        assert int(data.min()) >= qtype.qmin and int(data.max()) <= qtype.qmax


def test_scale_shapes_follow_granularity():
    x = torch.randn(8, 256)
    assert compute_qparams(x, "int8", "per_tensor", True)[0].shape == ()
    assert compute_qparams(x, "int8", "per_channel", True)[0].shape == (8,)
    assert compute_qparams(x, "int8", "per_channel:1", True)[0].shape == (256,)
    assert compute_qparams(x, "int4", "group:128", False)[0].shape == (8, 2)


def test_group_size_that_does_not_divide_is_a_clear_error():
    with pytest.raises(QuantizationError, match="does not divide"):
        quantize_tensor(torch.randn(4, 96), "int4", "group:64")


@pytest.mark.parametrize("text", ["group:48", "per_row", "group:"])
def test_unknown_granularity_is_refused(text):
    with pytest.raises(InvalidRecipeError):
        Granularity.parse(text)


def test_unknown_type_is_refused():
    with pytest.raises(InvalidRecipeError, match="int8"):
        get_qtype("int3")


def test_nan_weights_are_refused():
    x = torch.randn(4, 32)
    x[1, 2] = float("nan")
    with pytest.raises(QuantizationError, match="NaN"):
        quantize_tensor(x, "int8", "per_channel")


def test_fp16_overflow_is_refused():
    with pytest.raises(QuantizationError, match="fp16"):
        quantize_tensor(torch.tensor([1e6]), "fp16")


@given(arrays("uint8", st.tuples(st.integers(1, 5), st.integers(1, 8).map(lambda n: 2 * n)),
              elements=st.integers(0, 15)))
def test_int4_packing_round_trips_and_halves_the_bytes(values):
    x = torch.from_numpy(values)
    packed = pack_int4(x)
    assert packed.numel() * 2 == x.numel()
    assert torch.equal(unpack_int4(packed), x)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_symmetric_int4_puts_the_largest_magnitude_on_its_extra_level(sign):
    """Stored unsigned around 8, a symmetric int4 grid reaches -8 steps but only +7: the value of
    largest magnitude takes the -8 level whatever its sign (a negative scale flips the grid), so
    the step is a quarter smaller than a ±7 grid's, and a value as large on the other side still
    fits (the step grows rather than clip it)."""
    x = sign * torch.tensor([[1.0, -0.5, 0.25, 0.0] * 8, [1.0, -1.0, 0.5, 0.0] * 8])
    quantized = quantize_tensor(x, "uint4", "group:32", symmetric=True)
    assert torch.allclose(quantized.scale.abs().reshape(-1), torch.tensor([1 / 8, 1 / 7]))
    assert float(torch.sign(quantized.scale[0, 0])) == -sign
    assert int(quantized.data[0, 0]) == 0  # x = scale * (0 - 8): the largest magnitude, exactly
    assert torch.equal(quantized.dequantize()[1, :2], x[1, :2])  # ±1 as ±7 steps of 1/7: not clipped


@settings(max_examples=60, deadline=None)
@given(matrices())
def test_a_grid_with_a_minimum_rounds_within_half_a_step(array):
    x = torch.from_numpy(array)
    quantized = quantize_tensor(x, "uint4", "group:32", symmetric=False, minimum=True)
    assert quantized.zero_point is None and quantized.minimum is not None
    error = to_blocks((quantized.dequantize() - x).abs(), quantized.granularity)
    assert bool((error <= quantized.scale.reshape(-1, 1) / 2 * (1 + 1e-5) + 1e-6).all())
    levels = to_blocks(quantized.data, quantized.granularity).float() * quantized.scale.reshape(-1, 1)
    assert torch.equal(quantized.dequantize(), (levels + quantized.minimum.reshape(-1, 1)).reshape(x.shape))


def test_a_minimum_follows_a_group_far_from_zero_where_a_zero_point_cannot():
    # values in [10, 11]: a grid through 0 spans [0, 11] with 15 steps; one from the minimum, [10, 11]
    x = 10 + torch.rand(4, 64, generator=torch.Generator().manual_seed(0))
    through_zero = quantize_tensor(x, "uint4", "group:32", symmetric=False, scale_dtype=torch.float16)
    from_minimum = quantize_tensor(x, "uint4", "group:32", symmetric=False, scale_dtype=torch.float16,
                                   minimum=True)
    assert (from_minimum.dequantize() - x).abs().max() < (through_zero.dequantize() - x).abs().max() / 5
    assert torch.equal(from_minimum.minimum.half().float(), from_minimum.minimum)  # as Q4_1 holds it
    assert torch.equal(from_minimum.scale.half().float(), from_minimum.scale)


def test_a_constant_group_with_a_minimum_round_trips():
    constant = torch.full((2, 64), -3.5)
    quantized = quantize_tensor(constant, "uint4", "group:32", symmetric=False, minimum=True)
    assert torch.equal(quantized.dequantize(), constant)


@pytest.mark.parametrize(("qtype", "symmetric"), [("int4", False), ("uint4", True)])
def test_a_minimum_is_for_asymmetric_unsigned_grids_only(qtype, symmetric):
    with pytest.raises(QuantizationError, match="asymmetric and unsigned"):
        quantize_tensor(torch.randn(2, 32), qtype, "group:32", symmetric=symmetric, minimum=True)
