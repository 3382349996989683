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
from tests.fixtures_models import tiny_llama, token_batches, trained_like_llama

SPECS = [LayerSpec("weight_only", "int4", "group:32", False),
         LayerSpec("weight_only", "int4", "group:32", True),
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


@pytest.mark.parametrize("spec", SPECS, ids=["int4-asymmetric", "int4-symmetric", "int8"])
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


@pytest.mark.parametrize("spec", SPECS[:2], ids=["asymmetric", "symmetric"])
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
    warned = r"8 tokens, fewer than the 64 inputs of model\.layers\.0\."
    with pytest.warns(lowbit.LowbitWarning, match=warned):
        quantized = lowbit.quantize(model, lowbit.make_recipe("w4-gptq", granularity="group:32"),
                                    calibration=short, progress=False)
    assert isinstance(quantized.model.layers[0].self_attn.q_proj, QLinear)
