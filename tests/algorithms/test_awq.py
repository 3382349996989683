"""AWQ (lowbit.algorithms.awq, lowbit.transform.awq): activation-aware scales that lower the
output error of round-to-nearest on the same grid, folded into a Llama model without changing
its float output."""

from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.algorithms.awq import awq, input_scale
from lowbit.errors import LowbitWarning
from lowbit.nn.qweight import round_to_nearest
from lowbit.nn.spec import LayerSpec
from tests.algorithms.test_gptq import _layer, _output_error
from tests.fixtures_models import tiny_bert, tiny_llama

SPEC = LayerSpec("weight_only", "int4", "group:32", False)


@pytest.mark.parametrize("outlier", [False, True], ids=["plain", "outlier-channel"])
def test_awq_beats_round_to_nearest_on_the_layer_output(outlier):
    weight, inputs = _layer(outlier)
    hessian = 2 * inputs.T @ inputs / inputs.shape[0]
    scale = input_scale([weight], hessian, SPEC)
    scaled_hessian = hessian / (scale[:, None] * scale[None, :])
    rounded = awq(weight * scale, SPEC, scaled_hessian).dequantize() / scale  # the columns scaled back
    nearest = _output_error(weight, round_to_nearest(weight, SPEC).dequantize(), inputs)
    assert _output_error(weight, rounded, inputs) < (0.6 if outlier else 0.95) * nearest
    if outlier:  # the planted channel's column gets the largest factor, so the finest steps
        assert int(scale.argmax()) == 7


def _calibration(count=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 64, (4, 32), generator=generator)} for _ in range(count)]


def test_awq_folds_its_scales_into_a_llama_and_beats_round_to_nearest():
    model = tiny_llama()
    original = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    test = _calibration(1, seed=1)[0]
    with torch.inference_mode():
        expected = model(**test).logits
        quantized = {recipe: lowbit.quantize(model, recipe, calibration=_calibration(), progress=False)
                     for recipe in ("w4-g64", "w4-awq")}
        errors = {name: float(((q(**test).logits - expected) ** 2).mean()) for name, q in quantized.items()}
    assert errors["w4-awq"] < errors["w4-g64"]
    assert all(torch.equal(tensor, original[name]) for name, tensor in model.state_dict().items())
    norm = quantized["w4-awq"].model.layers[0].input_layernorm.weight
    assert not torch.allclose(norm, model.model.layers[0].input_layernorm.weight)  # the scales went there


def test_awq_on_a_model_without_norm_projection_pairs_says_only_clipping_applies():
    ids = torch.randint(1, 64, (2, 8))
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    with pytest.warns(LowbitWarning, match="only its clipping search applies"):
        lowbit.quantize(tiny_bert(), "w4-awq", calibration=batches, progress=False)


def test_linears_overridden_to_an_algorithm_without_scaling_keep_their_columns():
    """The MLP rounded by GPTQ (an override): its norm and its Linears are not scaled by AWQ."""
    model = tiny_llama()
    recipe = lowbit.make_recipe("w4-awq", overrides={"model.layers.*.mlp.*": "w4-gptq"})
    quantized = lowbit.quantize(model, recipe, calibration=_calibration(), progress=False)
    layer, original = quantized.model.layers[0], model.model.layers[0]
    assert torch.equal(layer.post_attention_layernorm.weight, original.post_attention_layernorm.weight)
    assert not torch.allclose(layer.input_layernorm.weight, original.input_layernorm.weight)
