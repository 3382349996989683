"""Scale tuning (lowbit.qat.tune_scales): integers fixed, group scales and norms trained against
the float model; the result exports and reloads as any quantized model."""

import copy

import pytest
import torch
import torch.nn.functional as F

import lowbit
from lowbit.errors import QuantizationError
from tests.fixtures_models import tiny_cnn, tiny_mlp, token_batches, trained_like_llama


def _kl(model, teacher, batches) -> float:
    """Summed KL divergence of `model`'s next-token distributions from `teacher`'s."""
    with torch.no_grad():
        return sum(float(F.kl_div(F.log_softmax(model(**b).logits, -1),
                                  F.log_softmax(teacher(**b).logits, -1), log_target=True,
                                  reduction="batchmean")) for b in batches)


def _integers(model) -> dict[str, torch.Tensor]:
    return {name: module.quantized_weight().data.clone() for name, module in model.named_modules()
            if hasattr(module, "quantized_weight")}


@pytest.fixture(scope="module")
def tuned():
    teacher = trained_like_llama()
    train, held_out = token_batches(teacher, 16, seed=1), token_batches(teacher, 8, seed=2)
    quantized = lowbit.quantize(copy.deepcopy(teacher), "q4_0", progress=False)
    before = copy.deepcopy(quantized)
    result = lowbit.qat.tune_scales(quantized, teacher, train, steps=60, lr=1e-2, progress=False)
    return teacher, before, quantized, result, held_out


def test_tuning_brings_held_out_outputs_closer_to_the_teacher(tuned):
    teacher, before, after, result, held_out = tuned
    assert _kl(after, teacher, held_out) < 0.9 * _kl(before, teacher, held_out)  # measured 0.81
    assert result.steps == 60 and result.curve[-1][2] < result.curve[0][2]


def test_integers_stay_and_scales_stay_float16_values(tuned):
    _, before, after, _, _ = tuned
    old, new = _integers(before), _integers(after)
    assert old.keys() == new.keys() and all(torch.equal(old[name], new[name]) for name in old)
    changed = 0
    for name, module in after.named_modules():
        if getattr(module, "weight_scale", None) is None:
            continue
        scale = module.weight_scale
        assert torch.equal(scale.half().float(), scale), name
        original = before.get_submodule(name).weight_scale
        assert torch.equal(torch.sign(scale), torch.sign(original)), name  # flipped grids stay flipped
        changed += not torch.equal(scale, original)
    assert changed >= 10  # every block Linear of both layers trained


def test_a_tuned_model_saves_and_reloads_with_its_record(tuned, tmp_path):
    teacher, _, after, _, held_out = tuned
    folder = lowbit.save(after, tmp_path / "tuned", runtime="torch")
    loaded = lowbit.load(folder, skeleton=trained_like_llama())
    with torch.no_grad():
        assert torch.equal(loaded(**held_out[0]).logits, after(**held_out[0]).logits)
    assert loaded.lowbit_training["method"] == "scale tuning (distillation)"


def test_models_with_quantized_activations_are_refused():
    model = tiny_mlp().eval()
    quantized = lowbit.quantize(model, "w8a8-dynamic", progress=False)
    with pytest.raises(QuantizationError, match="weight-only"):
        lowbit.qat.tune_scales(quantized, model, [torch.randn(4, 64)], steps=1, progress=False)


def test_grids_with_a_minimum_are_refused():
    model = tiny_mlp().eval()
    quantized = lowbit.quantize(model, "q4_1", progress=False)
    with pytest.raises(QuantizationError, match="has a minimum"):
        lowbit.qat.tune_scales(quantized, model, [torch.randn(4, 64)], steps=1, progress=False)


def test_a_float_model_is_refused():
    model = tiny_mlp().eval()
    with pytest.raises(QuantizationError, match="no group-wise weight-only Linear"):
        lowbit.qat.tune_scales(copy.deepcopy(model), model, [torch.randn(4, 64)], steps=1, progress=False)


def test_models_with_quantized_convolutions_are_refused():
    model = tiny_cnn().eval()
    quantized = lowbit.quantize(model, "w8", progress=False)
    with pytest.raises(QuantizationError, match="Linear and Embedding"):
        lowbit.qat.tune_scales(quantized, model, [torch.randn(2, 3, 16, 16)], steps=1, progress=False)


def test_a_tied_head_and_embedding_train_one_set_of_scales(monkeypatch):
    """A tied LM head and embedding hold one scale tensor: the student trains it as one, so the
    model written back computes what the student trained to (no embedding left on old scales)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lowbit.transform.scale_tuning import _student, write_back

    monkeypatch.setenv("LOWBIT_KERNEL", "reference")  # the float math the student runs
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    teacher = LlamaForCausalLM(config).eval()
    quantized = lowbit.quantize(copy.deepcopy(teacher), "w4-g32", progress=False)
    assert quantized.lm_head.weight_scale is quantized.model.embed_tokens.weight_scale
    student, tuned, norms = _student(quantized)
    assert {"lm_head", "model.embed_tokens"} <= tuned.keys()
    assert tuned["lm_head"].log_factor is tuned["model.embed_tokens"].log_factor
    before = quantized.model.embed_tokens.weight_scale.clone()
    lowbit.distill(student, teacher, token_batches(teacher, 4, seed=1), steps=8, lr=1e-2, progress=False)
    write_back(quantized, tuned, norms)
    assert not torch.equal(quantized.model.embed_tokens.weight_scale, before)
    ids = token_batches(teacher, 1, seed=2)[0]
    with torch.no_grad():
        torch.testing.assert_close(quantized(**ids).logits, student(**ids).logits, rtol=1e-4, atol=1e-4)
