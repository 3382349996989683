"""GPTQ (lowbit.algorithms.gptq): lower output error than round-to-nearest on the same grid, a
planted outlier channel absorbed, and the block-by-block walk on a real transformers model."""

from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.algorithms.gptq import gptq
from lowbit.errors import QuantizationError
from lowbit.nn import QLinear
from lowbit.nn.qweight import round_to_nearest
from lowbit.nn.spec import LayerSpec
from lowbit.transform.quantize import quantized_modules
from tests.fixtures_models import (
    StaticSamePaddingConv,
    residual_net,
    tiny_llama,
    token_batches,
    trained_like_llama,
)

SPECS = [LayerSpec("weight_only", "int4", "group:32", False),
         LayerSpec("weight_only", "int4", "group:32", True),
         LayerSpec("weight_only", "int8", "per_channel", True),
         LayerSpec("weight_only", "int4", "group:32", False, scale_dtype="float16", zero_point="minimum")]


def _layer(outlier: bool = False, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and correlated calibration inputs (one channel 20x the others when `outlier`)."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(48, 128, generator=generator)
    inputs = torch.randn(1024, 128, generator=generator) @ torch.randn(128, 128, generator=generator) * 0.3
    if outlier:
        inputs[:, 7] *= 20
    return weight, inputs


def _output_error(weight: torch.Tensor, rounded: torch.Tensor, inputs: torch.Tensor) -> float:
    return float(((inputs @ (weight - rounded).T) ** 2).mean())


@pytest.mark.parametrize("spec", SPECS, ids=["int4-asymmetric", "int4-symmetric", "int8", "q4_1"])
@pytest.mark.parametrize("outlier", [False, True], ids=["plain", "outlier-channel"])
def test_gptq_beats_round_to_nearest_on_the_layer_output(spec, outlier):
    weight, inputs = _layer(outlier)
    hessian = 2 * inputs.T @ inputs / inputs.shape[0]
    nearest, rounded = round_to_nearest(weight, spec), gptq(weight, spec, hessian)
    assert _output_error(weight, rounded.dequantize(), inputs) < 0.7 * _output_error(
        weight, nearest.dequantize(), inputs)
    # static groups: one grid per group, no wider than round-to-nearest's, every integer on it
    assert rounded.scale.shape == nearest.scale.shape
    assert bool((rounded.scale.abs() <= nearest.scale.abs() * (1 + 1e-6)).all())  # symmetric int4: may be < 0
    assert (rounded.zero_point is None) == (nearest.zero_point is None)
    limit = rounded.qtype.symmetric_qmax if spec.symmetric and rounded.qtype.is_signed else None
    low, high = (-limit, limit) if limit else (rounded.qtype.qmin, rounded.qtype.qmax)
    assert low <= int(rounded.data.min()) and int(rounded.data.max()) <= high


@pytest.mark.parametrize("spec", [*SPECS[:2], SPECS[3]], ids=["asymmetric", "symmetric", "q4_1"])
def test_the_searched_grid_never_rounds_a_group_worse_than_round_to_nearest(spec):
    from lowbit.algorithms.gptq import _grid_error, searched_grid

    weight, inputs = _layer(outlier=True)
    weight[0, 3] = 12.0  # one outlier weight sets its group's range
    importance = inputs.pow(2).mean(dim=0).reshape(1, -1)
    searched, nearest = searched_grid(weight, spec, importance), round_to_nearest(weight, spec)
    searched_error = _grid_error(weight, searched, importance)
    nearest_error = _grid_error(weight, nearest, importance)
    assert bool((searched_error <= nearest_error * (1 + 1e-6)).all())
    assert float(searched_error.sum()) < 0.9 * float(nearest_error.sum())


def test_inputs_that_are_always_zero_do_not_break_it():
    weight, inputs = _layer()
    inputs[:, :5] = 0
    rounded = gptq(weight, SPECS[0], 2 * inputs.T @ inputs / inputs.shape[0])
    assert torch.isfinite(rounded.dequantize()).all()


def test_a_hessian_with_nan_is_refused():
    weight, inputs = _layer()
    hessian = inputs.T @ inputs
    hessian[3, 3] = float("nan")
    with pytest.raises(QuantizationError, match="NaN or Inf"):
        gptq(weight, SPECS[0], hessian)


def test_block_by_block_gptq_on_a_llama_is_closer_to_float_than_round_to_nearest():
    model = trained_like_llama()
    calibration, [held_out] = token_batches(model, 8, 0), token_batches(model, 1, 1)
    reference = model(**held_out).logits
    recipe = lowbit.make_recipe("w4-gptq", granularity="group:32")
    errors = {}
    for name in ("rtn", "gptq"):
        quantized = lowbit.quantize(model, lowbit.make_recipe(recipe, algorithm=name),
                                    calibration=calibration, progress=False)
        with torch.inference_mode():
            errors[name] = float(((quantized(**held_out).logits - reference) ** 2).mean())
    assert errors["gptq"] < errors["rtn"]
    assert isinstance(quantized.model.layers[1].mlp.down_proj, QLinear)
    assert isinstance(quantized.lm_head, QLinear)  # outside the blocks: rounded to nearest


def test_gptq_without_calibration_says_what_to_pass():
    with pytest.raises(QuantizationError, match="calibration"):
        lowbit.quantize(tiny_llama(), "w4-gptq", progress=False)


def test_shared_input_products_equal_each_linears_own_hessian():
    from lowbit.transform.sequential import _Hessians

    model = tiny_llama()
    block = model.model.layers[0]
    names = ["self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    handles = [block.get_submodule(name).register_forward_hook(
        lambda _m, inputs, _o, name=name: seen[name].append(inputs[0].reshape(-1, inputs[0].shape[-1])))
        for name in names]
    hessians = _Hessians(block, {name: block.get_submodule(name) for name in names})
    with torch.inference_mode():
        for batch in token_batches(model, 3, 2):
            model(**batch)
    gathered = hessians.remove()
    for handle in handles:
        handle.remove()
    for name in names:
        rows = torch.cat(seen[name])
        torch.testing.assert_close(gathered[name], 2 * rows.T @ rows / rows.shape[0], rtol=1e-4, atol=1e-5)


def test_padding_tokens_stay_out_of_the_hessians():
    from lowbit.transform.sequential import quantize_blocks

    model = tiny_llama()
    names = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"]
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 16:] = 0  # right padding: the real tokens never attend to it

    def hessians_with_padding(token: int) -> dict[str, torch.Tensor]:
        padded = ids.clone()
        padded[1, 16:] = token
        seen = {}

        def keep(name, extra):
            seen[name] = extra["hessian"]
            return model.get_submodule(name)
        quantize_blocks(model, names, [{"input_ids": padded, "attention_mask": mask}], keep, progress=False)
        return seen

    first, second = hessians_with_padding(5), hessians_with_padding(60)
    for name in names:
        torch.testing.assert_close(first[name], second[name])


def test_a_non_finite_hessian_is_refused_naming_the_layer():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].post_attention_layernorm.weight[0] = float("inf")  # layer 0's MLP sees inf
    with pytest.raises(QuantizationError, match=r"model\.layers\.0\.mlp\.\w+_proj: .*NaN or Inf"):
        lowbit.quantize(model, lowbit.make_recipe("w4-gptq", granularity="group:32"),
                        calibration=token_batches(model, 2, 0), progress=False)


def test_calibration_shorter_than_a_layers_inputs_is_damped_with_a_warning():
    """8 tokens for 64 inputs: every Hessian is singular; GPTQ damps it, says so, and still rounds."""
    model = tiny_llama()
    short = [{"input_ids": torch.randint(0, model.config.vocab_size, (1, 8),
                                         generator=torch.Generator().manual_seed(0))}]
    warned = r"8 tokens \(or patches\), fewer than the 64 inputs of model\.layers\.0\."
    with pytest.warns(lowbit.LowbitWarning, match=warned):
        quantized = lowbit.quantize(model, lowbit.make_recipe("w4-gptq", granularity="group:32"),
                                    calibration=short, progress=False)
    assert isinstance(quantized.model.layers[0].self_attn.q_proj, QLinear)


CONVOLUTIONS = {
    "dense": lambda: torch.nn.Conv2d(8, 12, 3, padding=1),
    "grouped-strided": lambda: torch.nn.Conv2d(8, 12, 3, stride=2, padding=1, groups=4),
    "depthwise": lambda: torch.nn.Conv2d(8, 8, 3, padding=1, groups=8),
    "same-padding-string": lambda: torch.nn.Conv2d(8, 6, (2, 4), padding="same", dilation=(1, 2)),
    "static-same-padding": lambda: StaticSamePaddingConv(8, 6, 3, stride=2),
}


@pytest.mark.parametrize("make", CONVOLUTIONS.values(), ids=CONVOLUTIONS.keys())
def test_a_convolutions_patches_reproduce_its_output(make):
    """The rows a convolution's Hessian is gathered from (lowbit.nn.qconv.input_patches) are
    the inputs its weight rows multiply: patches x weight rows, group by group, is its output."""
    from lowbit.nn.qconv import input_patches

    torch.manual_seed(0)
    conv, x = make().eval(), torch.randn(2, 8, 9, 11)
    with torch.no_grad():
        expected = conv(x) - (0 if conv.bias is None else conv.bias.reshape(1, -1, 1, 1))
        patches = input_patches(conv, x)  # (groups, batch x positions, columns)
    rows = conv.weight.detach().reshape(conv.groups, conv.out_channels // conv.groups, -1)
    products = patches @ rows.transpose(1, 2)  # (groups, batch x positions, group's channels)
    batch, _, height, width = expected.shape
    got = products.reshape(conv.groups, batch, height * width, -1).permute(1, 0, 3, 2)
    torch.testing.assert_close(got.reshape(expected.shape), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["dense", "depthwise"])
def test_gptq_beats_round_to_nearest_on_a_convolutions_output(kind):
    from lowbit.nn.qconv import input_patches

    torch.manual_seed(1)
    conv = CONVOLUTIONS[kind]().eval()
    inputs = torch.nn.functional.avg_pool2d(torch.randn(16, 8, 14, 14), 3, 1, 1)  # smooth: correlated patches
    patches = input_patches(conv, inputs)
    hessian = 2 * patches.transpose(1, 2) @ patches / patches.shape[1]
    spec = SPECS[2]  # int8 per channel, as convolutions are stored
    weight = conv.weight.detach()
    nearest, rounded = round_to_nearest(weight, spec), gptq(weight, spec, hessian.squeeze(0))
    assert rounded.data.shape == weight.shape and rounded.scale.shape == nearest.scale.shape

    def error(quantized):
        with torch.no_grad():
            return float(((torch.nn.functional.conv2d(inputs, weight - quantized.dequantize(), None,
                                                      conv.stride, conv.padding, conv.dilation,
                                                      conv.groups)) ** 2).mean())
    assert error(rounded) < 0.7 * error(nearest)


def test_block_by_block_gptq_on_a_cnn_is_closer_to_float_than_round_to_nearest(monkeypatch):
    """A plain nn.Sequential of convolutions is its own list of blocks: int8 weights rounded by
    GPTQ give outputs closer to float than rounded to nearest, and the static scheme takes them
    (every convolution quantized once, its weight GPTQ's)."""
    monkeypatch.setenv("LOWBIT_KERNEL", "reference")
    model = residual_net()
    generator = torch.Generator().manual_seed(5)
    smooth = [torch.nn.functional.avg_pool2d(torch.randn(8, 3, 12, 12, generator=generator), 3, 1, 1)
              for _ in range(5)]
    calibration, held_out = smooth[:4], smooth[4]
    with torch.no_grad():
        reference = model(held_out)
    errors, weights = {}, {}
    for algorithm in ("rtn", "gptq"):
        recipe = lowbit.make_recipe("w8", algorithm=algorithm)
        quantized = lowbit.quantize(model, recipe, calibration=calibration, progress=False)
        with torch.no_grad():
            errors[algorithm] = float(((quantized(held_out) - reference) ** 2).mean())
        weights[algorithm] = {name: module.weight for name, module in quantized_modules(quantized).items()}
    assert errors["gptq"] < 0.8 * errors["rtn"]
    static = lowbit.quantize(model, lowbit.make_recipe("w8a8-static", algorithm="gptq"),
                             calibration=calibration, progress=False)
    modules = quantized_modules(static)
    assert len(modules) == 6 and modules.keys() == weights["gptq"].keys()  # none left, none twice
    assert all(torch.equal(module.weight, weights["gptq"][name]) for name, module in modules.items())
