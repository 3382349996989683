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
from tests.fixtures_models import tiny_llama

SPECS = [LayerSpec("weight_only", "int4", "group:32", False), LayerSpec("weight_only", "int4", "group:32", True),
         LayerSpec("weight_only", "int8", "per_channel", True)]


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


@pytest.mark.parametrize("spec", SPECS, ids=lambda spec: f"{spec.weight}-{spec.granularity}-sym{spec.symmetric}")
@pytest.mark.parametrize("outlier", [False, True], ids=["plain", "outlier-channel"])
def test_gptq_beats_round_to_nearest_on_the_layer_output(spec, outlier):
    weight, inputs = _layer(outlier)
    hessian = 2 * inputs.T @ inputs / inputs.shape[0]
    nearest, rounded = round_to_nearest(weight, spec), gptq(weight, spec, hessian)
    assert _output_error(weight, rounded.dequantize(), inputs) < 0.5 * _output_error(
        weight, nearest.dequantize(), inputs)
    # static groups: the grid is round-to-nearest's, only the integers differ, all on the grid
    assert torch.equal(rounded.scale, nearest.scale)
    assert (rounded.zero_point is None) == (nearest.zero_point is None)
    assert rounded.qtype.qmin <= int(rounded.data.min()) and int(rounded.data.max()) <= rounded.qtype.qmax


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


def _batches(model, count: int, seed: int) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, model.config.vocab_size, (2, 32), generator=generator)}
            for _ in range(count)]


def test_block_by_block_gptq_on_a_llama_is_closer_to_float_than_round_to_nearest():
    model = tiny_llama()
    for parameter in model.parameters():  # trained-like weights: heavier tails than the init
        parameter.data += 0.05 * torch.randn_like(parameter).pow(3)
    calibration, [held_out] = _batches(model, 8, 0), _batches(model, 1, 1)
    reference = model(**held_out).logits
    recipe = lowbit.make_recipe("w4-gptq", granularity="group:32")
    errors = {}
    for name in ("rtn", "gptq"):
        quantized = lowbit.quantize(model, lowbit.make_recipe(recipe, algorithm=name), calibration=calibration,
                                    progress=False)
        with torch.inference_mode():
            errors[name] = float(((quantized(**held_out).logits - reference) ** 2).mean())
    assert errors["gptq"] < errors["rtn"]
    assert isinstance(quantized.model.layers[1].mlp.down_proj, QLinear)
    assert isinstance(quantized.lm_head, QLinear)  # outside the blocks: rounded to nearest


def test_gptq_without_calibration_says_what_to_pass():
    with pytest.raises(QuantizationError, match="calibration"):
        lowbit.quantize(tiny_llama(), "w4-gptq", progress=False)
