"""SmoothQuant: the float model is unchanged, activation outliers move into the weights, and W8A8
gets closer to the original; what it cannot smooth exactly it refuses."""

import pytest
import torch

import lowbit
from lowbit.errors import QuantizationError
from lowbit.transform.smooth import smooth, smoothing_pairs
from tests.fixtures_models import tiny_bert, tiny_llama


def _outlier_llama():
    """tiny_llama with an activation outlier planted exactly: channel 3 of every layer's normed
    input is 60× larger and the projections reading it 60× smaller (the float model is the same)."""
    model = tiny_llama()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[3] *= 60
            for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                projection.weight[:, 3] /= 60
    return model


def _batches():
    generator = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 64, (2, 16), generator=generator)} for _ in range(4)]


def _logits(model, batch):
    with torch.inference_mode():
        return model(**batch).logits


def test_smoothing_leaves_the_float_model_as_it_was():
    model, batches = _outlier_llama(), _batches()
    before = _logits(model, batches[0])
    pairs = smooth(model, batches, 0.5)
    assert len(pairs) == 3 * len(model.model.layers)
    assert torch.allclose(_logits(model, batches[0]), before, atol=1e-4, rtol=1e-4)
    assert model.model.layers[0].input_layernorm.weight[3] < 60  # the outlier went into the weights


def test_smoothing_brings_w8a8_closer_to_the_original():
    from lowbit.evaluate.metrics import sqnr_db

    model, batches = _outlier_llama(), _batches()
    reference = torch.cat([_logits(model, batch) for batch in batches])
    sqnr = {}
    for alpha in (None, 0.5):
        recipe = lowbit.make_recipe("w8a8-dynamic", smoothing=alpha)
        quantized = lowbit.quantize(model, recipe, calibration=batches, progress=False)
        sqnr[alpha] = sqnr_db(reference, torch.cat([_logits(quantized, batch) for batch in batches]))
    assert sqnr[0.5] > sqnr[None] + 3  # dB
    assert lowbit.quantize(model, lowbit.make_recipe("w8", smoothing=0.5), calibration=batches,
                           progress=False).lowbit_recipe.smoothing == 0.5


def test_what_cannot_be_smoothed_exactly_is_refused():
    assert smoothing_pairs(tiny_bert()) == []  # post-norm: the norm's output feeds the residual too
    with pytest.raises(QuantizationError, match="no norm → Linear pairs"):
        lowbit.quantize(tiny_bert(), lowbit.make_recipe("w8a8-dynamic", smoothing=0.5),
                        calibration=[torch.randint(0, 30, (1, 8))], progress=False)
    with pytest.raises(QuantizationError, match="calibration=\\[batch"):
        lowbit.quantize(tiny_llama(), lowbit.make_recipe("w8a8-dynamic", smoothing=0.5), progress=False)
    with pytest.raises(lowbit.InvalidRecipeError):
        lowbit.make_recipe("w8a8-dynamic", smoothing=1.5)


def test_a_smoothed_model_saves_and_loads_with_its_recipe(tmp_path):
    model, batches = _outlier_llama(), _batches()
    quantized = lowbit.quantize(model, lowbit.make_recipe("w8a8-dynamic", smoothing=0.5), calibration=batches,
                                progress=False)
    lowbit.save(quantized, tmp_path / "q", runtime="torch")
    loaded = lowbit.load(tmp_path / "q")
    assert loaded.lowbit_recipe.smoothing == 0.5
    assert torch.equal(_logits(loaded, batches[0]), _logits(quantized, batches[0]))
