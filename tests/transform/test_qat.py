"""Quantization-aware training (lowbit.qat): fake-quant numerics equal the converted modules', training
recovers what rounding lost, and bad input is refused with the model untouched."""

import copy

import pytest
import torch
from torch import nn

import lowbit
from lowbit.errors import QuantizationError
from lowbit.nn.fake_quant import FakeQuant
from lowbit.qat import DistillationError
from lowbit.transform.distill import embedding_loss, layers_loss
from lowbit.transform.qat import fake_quant_modules
from lowbit.transform.quantize import quantized_modules
from tests.fixtures_models import residual_net, tied_lm, tiny_cnn, tiny_mlp

RECIPES = ["w4", "w4-g32", "w4-hqq", "q4_0", "w8", "w8a8-dynamic", "w8a8-static", "fp16", "bf16"]


def _calibration(shape, count=4):
    generator = torch.Generator().manual_seed(3)
    return [torch.randn(8, *shape, generator=generator) for _ in range(count)]


def _same_outputs(prepared, converted, batch, tolerance):
    with torch.no_grad():
        fake, real = prepared.eval()(batch), converted(batch)
    assert torch.allclose(fake, real, atol=tolerance, rtol=0), float((fake - real).abs().max())


@pytest.mark.parametrize("recipe", RECIPES)
def test_fake_quant_outputs_equal_the_converted_reference_kernels(recipe, monkeypatch):
    monkeypatch.setenv("LOWBIT_KERNEL", "reference")  # the kernels every fast path is tested against
    model = tiny_mlp().eval()
    calibration = _calibration((64,))
    prepared = lowbit.qat.prepare(model, recipe, calibration=calibration, progress=False)
    converted = lowbit.qat.convert(prepared, progress=False)
    _same_outputs(prepared, converted, calibration[0], tolerance=1e-6)


def test_converted_equals_post_training_quantization_when_nothing_trained(monkeypatch):
    monkeypatch.setenv("LOWBIT_KERNEL", "reference")
    model, batch = tied_lm().eval(), torch.randint(0, 100, (4, 7))
    converted = lowbit.qat.convert(lowbit.qat.prepare(model, "w4-g32", progress=False), progress=False)
    ptq = lowbit.quantize(model, "w4-g32", progress=False)
    with torch.no_grad():
        assert torch.equal(converted(batch), ptq(batch))
    assert converted.head.weight is converted.embed.weight  # the tied table is stored once, as by quantize


def test_learned_scales_train_and_convert_to_the_same_numerics(monkeypatch):
    monkeypatch.setenv("LOWBIT_KERNEL", "reference")
    model, batch = tiny_mlp().eval(), _calibration((64,))[0]
    prepared = lowbit.qat.prepare(model, "w4-g32", learn_scales=True, progress=False)
    scales = [m.weight_scale for m in prepared.modules() if isinstance(m, FakeQuant)]
    before = [s.detach().clone() for s in scales]
    lowbit.qat.distill(prepared, model, [batch], steps=5, lr=1e-2, loss="mse", progress=False)
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, scales, strict=True))  # learned
    _same_outputs(prepared, lowbit.qat.convert(prepared, progress=False), batch, tolerance=1e-6)


def test_learned_ranges_train_and_convert_to_the_same_numerics(monkeypatch):
    monkeypatch.setenv("LOWBIT_KERNEL", "reference")
    model, calibration = tiny_mlp().eval(), _calibration((64,))
    prepared = lowbit.qat.prepare(model, "w8a8-static", calibration=calibration, learn_ranges=True,
                                  progress=False)
    fakes = [m for m in prepared.modules() if isinstance(m, FakeQuant)]
    # the first Linear's output grid is fused with the ReLU after it (lowbit.transform.fold): kept;
    # the last one's output is the model's, left float (LayerSpec.output): no grid to learn
    assert [set(fake.range_steps) for fake in fakes] == [{"input"}, {"input"}]
    assert fakes[1].spec.output == "float"
    before = [fake.ranges for fake in fakes]
    _same_outputs(prepared, lowbit.qat.convert(prepared, progress=False), calibration[1], tolerance=1e-6)
    lowbit.qat.distill(prepared, model, calibration, steps=5, lr=1e-2, loss="mse", progress=False)
    assert [fake.ranges for fake in fakes] != before  # learned
    _same_outputs(prepared, lowbit.qat.convert(prepared, progress=False), calibration[1], tolerance=1e-6)


def test_shared_static_grids_stay_as_calibrated_when_ranges_learn(monkeypatch):
    """A grid two modules share (a producer's output read on its consumer's input grid) cannot move
    for one alone: it stays as post-training quantization sets it."""
    monkeypatch.setenv("LOWBIT_KERNEL", "reference")
    model, calibration = residual_net().eval(), _calibration((3, 8, 8))
    prepared = lowbit.qat.prepare(model, "w8a8-static", calibration=calibration, learn_ranges=True,
                                  progress=False)
    fakes = {name: m for name, m in prepared.named_modules() if isinstance(m, FakeQuant)}
    assert any("output" not in fake.range_steps for fake in fakes.values())
    lowbit.qat.distill(prepared, model, calibration, steps=3, lr=1e-2, loss="mse", progress=False)
    converted = lowbit.qat.convert(prepared, progress=False)
    _same_outputs(prepared, converted, calibration[1], tolerance=1e-5)


def test_learning_ranges_without_static_grids_is_refused():
    with pytest.raises(QuantizationError, match="activation ranges"):
        lowbit.qat.prepare(tiny_mlp(), "w4", learn_ranges=True, progress=False)


def test_a_grid_with_a_minimum_is_refused_for_training():
    with pytest.raises(QuantizationError, match="a grid with a minimum"):
        lowbit.qat.prepare(tiny_mlp(), "q4_1", progress=False)


def test_fake_quant_conv_equals_the_converted_convolution(monkeypatch):
    monkeypatch.setenv("LOWBIT_KERNEL", "reference")
    calibration = _calibration((3, 8, 8))
    prepared = lowbit.qat.prepare(tiny_cnn().eval(), "w8a8-static", calibration=calibration, progress=False)
    _same_outputs(prepared, lowbit.qat.convert(prepared, progress=False), calibration[1], tolerance=1e-5)


@pytest.mark.parametrize("factory", [tiny_cnn, residual_net])
def test_static_convolutions_train_on_the_grids_post_training_quantization_gives(factory, monkeypatch):
    """Folded batch norms, shared grids and rounding points (lowbit.transform.fold) as in
    `lowbit.quantize`: untrained, the prepared model, its conversion and post-training
    quantization agree."""
    monkeypatch.setenv("LOWBIT_KERNEL", "reference")
    model, calibration = factory().eval(), _calibration((3, 8, 8))
    prepared = lowbit.qat.prepare(model, "w8a8-static", calibration=calibration, progress=False)
    converted = lowbit.qat.convert(prepared, progress=False)
    ptq = lowbit.quantize(model, "w8a8-static", calibration=calibration, progress=False)
    assert converted.lowbit_roundings == ptq.lowbit_roundings and converted.lowbit_folded == ptq.lowbit_folded
    _same_outputs(prepared, converted, calibration[1], tolerance=1e-5)
    _same_outputs(ptq, converted, calibration[1], tolerance=1e-5)


def test_distillation_recovers_what_rounding_lost():
    """A 4-bit MLP trained on its teacher's outputs is closer to them on held-out inputs than the
    post-training model of the same recipe."""
    teacher = tiny_mlp().eval()
    generator = torch.Generator().manual_seed(7)
    train = [torch.randn(32, 64, generator=generator) for _ in range(8)]
    held_out = torch.randn(256, 64, generator=generator)
    prepared = lowbit.qat.prepare(teacher, "w4-g32", progress=False)
    result = lowbit.qat.distill(prepared, teacher, train, steps=200, lr=3e-4, loss="mse", progress=False)
    converted = lowbit.qat.convert(prepared, progress=False)
    ptq = lowbit.quantize(teacher, "w4-g32", progress=False)
    with torch.no_grad():
        reference = teacher(held_out)
        ptq_error = float((ptq(held_out) - reference).pow(2).mean())
        qat_error = float((converted(held_out) - reference).pow(2).mean())
    assert qat_error < 0.8 * ptq_error, (qat_error, ptq_error)
    assert result.steps == 200 and result.curve[-1][2] < result.curve[0][2]
    assert converted.lowbit_training["steps"] == 200


def test_prepare_leaves_the_float_model_untouched():
    model = tiny_mlp().eval()
    state = copy.deepcopy(model.state_dict())
    prepared = lowbit.qat.prepare(model, "w4-g32", progress=False)
    lowbit.qat.distill(prepared, model, [torch.randn(4, 64)], steps=3, lr=1e-2, progress=False)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m, FakeQuant) for m in model.modules())


def test_convert_refuses_a_model_never_prepared():
    with pytest.raises(QuantizationError, match="never prepared"):
        lowbit.qat.convert(tiny_mlp())


def test_training_a_converted_model_is_refused():
    model = tiny_mlp().eval()
    converted = lowbit.qat.convert(lowbit.qat.prepare(model, "w8", progress=False), progress=False)
    state = copy.deepcopy(converted.state_dict())
    with pytest.raises(QuantizationError, match="integer"):
        lowbit.qat.distill(converted, model, [torch.randn(4, 64)], steps=1, progress=False)
    with pytest.raises(QuantizationError, match="integer"):
        lowbit.qat.prepare(converted, "w8", progress=False)
    assert all(torch.equal(state[k], v) for k, v in converted.state_dict().items())
    assert quantized_modules(converted)


def test_teacher_and_student_outputs_that_differ_are_refused():
    model = tiny_mlp().eval()
    prepared = lowbit.qat.prepare(model, "w8", progress=False)
    state = copy.deepcopy(prepared.state_dict())
    other = nn.Sequential(nn.Linear(64, 5))
    with pytest.raises(DistillationError, match="shape"):
        lowbit.qat.distill(prepared, other, [torch.randn(4, 64)], steps=1, progress=False)
    assert all(torch.equal(state[k], v) for k, v in prepared.state_dict().items())


def test_data_the_model_cannot_run_on_is_refused():
    model = tiny_mlp().eval()
    prepared = lowbit.qat.prepare(model, "w8", progress=False)
    with pytest.raises(DistillationError, match="cannot run on the first training batch"):
        lowbit.qat.distill(prepared, model, [torch.randn(4, 63)], steps=1, progress=False)


@pytest.mark.parametrize("budget", [{}, {"steps": 0}, {"time_budget": -1.0}])
def test_a_missing_or_empty_budget_is_refused(budget):
    model = tiny_mlp().eval()
    prepared = lowbit.qat.prepare(model, "w8", progress=False)
    with pytest.raises(DistillationError, match="budget"):
        lowbit.qat.distill(prepared, model, [torch.randn(4, 64)], progress=False, **budget)


def test_static_without_calibration_is_refused():
    with pytest.raises(QuantizationError, match="calibration"):
        lowbit.qat.prepare(tiny_mlp(), "w8a8-static", progress=False)


def test_a_trained_model_saves_and_loads_with_its_training_record(tmp_path):
    model = tiny_mlp().eval()
    prepared = lowbit.qat.prepare(model, "w4-g32", progress=False)
    lowbit.qat.distill(prepared, model, [torch.randn(8, 64)], steps=4, lr=1e-3, progress=False)
    converted = lowbit.qat.convert(prepared, progress=False)
    folder = lowbit.save(converted, tmp_path / "qat", runtime="torch")
    loaded = lowbit.load(folder, skeleton=tiny_mlp())
    batch = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(loaded(batch), converted(batch))
    assert loaded.lowbit_training["steps"] == 4 and len(loaded.lowbit_training["curve"]) >= 1


def test_minilm_trains_converts_and_reloads(minilm, wiki_sentences, tmp_path):
    """The real encoder: a few distillation steps on real sentences, then the lowbit folder."""
    model, tokenizer, _ = minilm
    prepared = lowbit.qat.prepare(model, "w4", progress=False)
    result = lowbit.qat.distill(prepared, model, wiki_sentences[-16:], tokenizer=tokenizer, steps=2,
                                batch_size=8, progress=False)
    assert result.loss == "embedding" and result.steps == 2
    converted = lowbit.qat.convert(prepared, progress=False)
    folder = lowbit.save(converted, tmp_path / "minilm-qat", runtime="torch")
    batch = lowbit.families.transformers.tokenize(tokenizer, wiki_sentences[:4])
    with torch.no_grad():
        expected = converted(**batch).last_hidden_state
        assert torch.equal(lowbit.load(folder)(**batch).last_hidden_state, expected)


def test_the_layers_loss_matches_every_layer_and_is_zero_only_when_all_agree():
    torch.manual_seed(0)
    teacher = torch.randn(4, 2, 5, 8)  # embeddings' output + 3 layers, batch 2, 5 positions, width 8
    batch = {"attention_mask": torch.ones(2, 5, dtype=torch.long)}
    assert float(layers_loss(teacher.clone(), teacher, batch)) == pytest.approx(0.0, abs=1e-6)
    inner_off = teacher.clone()
    inner_off[1] += 0.5  # only an intermediate layer differs: the last layer's loss sees nothing
    assert float(embedding_loss(inner_off[-1], teacher[-1], batch)) == pytest.approx(0.0, abs=1e-6)
    assert float(layers_loss(inner_off, teacher, batch)) > 0.01
    first_off = teacher.clone()
    first_off[0] += 0.5  # the embeddings' output is not matched: the layers after it carry what it lost
    assert float(layers_loss(first_off, teacher, batch)) == pytest.approx(0.0, abs=1e-6)


def test_the_layers_loss_on_plain_tensor_batches_is_refused():
    teacher = tiny_mlp().eval()
    prepared = lowbit.qat.prepare(teacher, "w8", progress=False)
    with pytest.raises(DistillationError, match="hidden states"):
        lowbit.qat.distill(prepared, teacher, [torch.randn(4, 64)], steps=1, loss="layers", progress=False)


def test_minilm_distils_layer_by_layer(minilm, wiki_sentences):
    model, tokenizer, _ = minilm
    prepared = lowbit.qat.prepare(model, "w4", progress=False)
    result = lowbit.qat.distill(prepared, model, wiki_sentences[-16:], tokenizer=tokenizer, steps=2,
                                batch_size=8, loss="layers", progress=False)
    assert result.loss == "layers" and result.steps == 2 and result.curve[0][2] > 0


def test_training_starts_from_gptqs_rounding_and_converts_to_it_untrained(monkeypatch):
    """With a GPTQ recipe the weights start from GPTQ's integers on a fixed grid: untrained, the
    prepared model, its conversion and post-training GPTQ agree; trained, the grid holds."""
    monkeypatch.setenv("LOWBIT_KERNEL", "reference")
    model, calibration = residual_net().eval(), _calibration((3, 8, 8))
    recipe = lowbit.make_recipe("w8a8-static", algorithm="gptq")
    prepared = lowbit.qat.prepare(model, recipe, calibration=calibration, progress=False)
    converted = lowbit.qat.convert(prepared, progress=False)
    ptq = lowbit.quantize(model, recipe, calibration=calibration, progress=False)
    for name, module in quantized_modules(ptq).items():
        torch.testing.assert_close(converted.get_submodule(name).weight, module.weight, rtol=0, atol=0)
    nearest = lowbit.quantize(model, "w8a8-static", calibration=calibration, progress=False)
    assert any(not torch.equal(module.weight, nearest.get_submodule(name).weight)
               for name, module in quantized_modules(ptq).items())  # GPTQ rounded differently
    _same_outputs(prepared, converted, calibration[1], tolerance=1e-5)
    _same_outputs(ptq, converted, calibration[1], tolerance=1e-5)
    grids = {name: fake.weight_scale.clone() for name, fake in fake_quant_modules(prepared).items()}
    lowbit.qat.distill(prepared, model, calibration, steps=3, lr=1e-2, progress=False)
    for name, fake in fake_quant_modules(prepared).items():
        assert torch.equal(fake.weight_scale, grids[name])
    _same_outputs(prepared, lowbit.qat.convert(prepared, progress=False), calibration[1], tolerance=1e-5)


@pytest.mark.parametrize("recipe", ["w4-hqq", "w4-awq"])
def test_algorithms_that_change_more_than_the_rounding_start_from_round_to_nearest(recipe):
    """HQQ's float zero points and AWQ's input scaling are no grid a FakeQuant trains on: the
    weights start from round-to-nearest, and a warning says so."""
    model = tiny_mlp().eval()
    with pytest.warns(lowbit.LowbitWarning, match="start from round-to-nearest"):
        prepared = lowbit.qat.prepare(model, recipe, calibration=[torch.randn(8, 64)], progress=False)
    for name, fake in fake_quant_modules(prepared).items():
        assert fake.weight_scale is None  # from each weight's own range, at every step
        assert torch.equal(fake.float_module.weight, model.get_submodule(name).weight)
