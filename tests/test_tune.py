"""lowbit.tune: budget, objective, layer fallback, the original when nothing passes, and the CLI."""

import json

import pytest
import torch
from typer.testing import CliRunner

import lowbit
from lowbit.cli import EXIT_BUDGET_MISSED, app
from lowbit.evaluate.metrics import top1_agreement
from lowbit.tune.search import safer_candidates, sensitivity
from tests.fixtures_models import sensitive_mlp, tiny_mlp


@pytest.fixture(scope="module")
def inputs():
    torch.manual_seed(1)
    return torch.randn(256, 16)


def test_layer_fallback_moves_the_sensitive_module_and_meets_the_budget(inputs):
    model = sensitive_mlp()
    result = lowbit.tune(model, inputs, metric="agreement", max_drop=0.05, candidates=["w4-g32", "fp16"],
                         final_comparison=False, progress=False)
    first = result.trials[0]
    assert first.label == "w4-g32" and not first.accepted and first.drop > 0.3
    assert result.met_budget and result.chosen.fallback_modules == ["2"]
    assert result.sensitivity[0]["modules"][0]["name"] == "2"
    assert result.recipe.overrides["2"].weights == "fp16" and result.recipe.weights == "int4"
    assert result.model[2].spec.weight == "fp16" and result.model[4].spec.weight == "int4"
    agreement = (result.model(inputs).argmax(-1) == model(inputs).argmax(-1)).float().mean()
    assert 1 - agreement <= 0.05


def test_sensitivity_ranks_the_planted_layer_first_and_leaves_the_model_untouched(inputs):
    model = sensitive_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ranked = sensitivity(model, lowbit.make_recipe("w4-g32"), [inputs[:64]],
                         fallback=lowbit.make_recipe("w8"))
    assert [row["name"] for row in ranked][0] == "2" and ranked[0]["sqnr_db"] < ranked[-1]["sqnr_db"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_size_objective_picks_the_smallest_within_budget_not_the_first():
    result = lowbit.tune(tiny_mlp().eval(), torch.randn(128, 64), metric="agreement", max_drop=0.1,
                         candidates=["fp16", "w8"], final_comparison=False, progress=False)
    assert [trial.accepted for trial in result.trials] == [True, True]
    assert result.chosen.label == "w8"
    assert result.chosen.size_bytes < result.trials[0].size_bytes


def test_nothing_within_budget_returns_the_original_and_says_so(inputs):
    model = sensitive_mlp()
    result = lowbit.tune(model, inputs, metric="agreement", max_drop=0.0, candidates=["w4-g32"],
                         progress=False)
    assert not result.met_budget and result.model is model and result.recipe is None
    assert "original model is returned" in result.message and "Closest: w4-g32" in result.message
    with pytest.raises(lowbit.AccuracyBudgetError) as raised:
        lowbit.tune(model, inputs, metric="agreement", max_drop=0.0, candidates=["w4-g32"], strict=True,
                    progress=False)
    assert raised.value.result.trials


def test_when_nothing_meets_the_budget_the_closest_candidate_is_distilled_and_judged_on_held_out_data(
        monkeypatch):
    monkeypatch.setenv("LOWBIT_KERNEL", "reference")  # the numerics it trains on (lowbit.nn.fake_quant)
    torch.manual_seed(1)
    model, data = tiny_mlp().eval(), torch.randn(256, 64)
    result = lowbit.tune(model, data, metric="agreement", max_drop=0.06, candidates=["w4-g32"],
                         time_budget=20, final_comparison=False, progress=False)
    post_training, distilled = result.trials
    assert post_training.label == "w4-g32" and not post_training.accepted
    # Judged against the post-training model on the same held-out half. On this tiny random task
    # distillation barely generalises: over 1-1000 steps (lr 1e-4, 1e-3) the held-out drop
    # measured 0.023-0.117 around post-training's 0.047, and the steps the 20 s allow depend on
    # the host's load. What this catches is a broken distillation (a diverged model flips most of
    # the 128 samples).
    with torch.no_grad():
        held_out_post_training = 1.0 - top1_agreement(
            model(data[128:]), lowbit.quantize(model, "w4-g32", progress=False)(data[128:]))
    assert distilled.label == "w4-g32 + distillation"
    assert distilled.drop <= held_out_post_training + 0.08
    assert "on the first 128 samples; judged on the other 128" in distilled.notes[0]
    # Whether it meets the budget depends on the steps the time allows (it did alone; under a
    # full test run's load it may not): when it does, it is the model tune returns.
    assert result.met_budget == distilled.accepted
    if distilled.accepted:
        assert result.chosen is distilled and "Chose w4-g32 + distillation" in result.message
        assert result.model.lowbit_training["method"] == "distillation"
    assert not hasattr(model, "lowbit_training")  # the original is untouched


def test_a_static_candidate_distils_with_its_activation_ranges_trained_too(monkeypatch):
    monkeypatch.setenv("LOWBIT_KERNEL", "reference")
    model, data = tiny_mlp().eval(), torch.randn(256, 64)
    result = lowbit.tune(model, data, metric="agreement", max_drop=0.0, candidates=["w8a8-static"],
                         time_budget=15, final_comparison=False, progress=False)
    post_training, distilled = result.trials
    assert post_training.drop > 0 and distilled.label == "w8a8-static + distillation"
    assert "samples, activation ranges trained too; judged on the other 128" in distilled.notes[0]


def test_distillation_is_not_tried_without_a_time_budget_and_the_report_says_so(inputs):
    result = lowbit.tune(tiny_mlp().eval(), torch.randn(64, 64), metric="agreement", max_drop=0.0,
                         candidates=["w4-g32"], final_comparison=False, progress=False)
    assert [trial.label for trial in result.trials] == ["w4-g32"]
    assert "w4-g32 + distillation (distillation runs only within a time budget" in result.message


def test_latency_objective_never_chooses_a_candidate_slower_than_the_original(inputs):
    result = lowbit.tune(tiny_mlp().eval(), torch.randn(128, 64), metric="agreement", max_drop=0.5,
                         objective="latency", candidates=["w8a8-dynamic", "w8", "fp16"],
                         final_comparison=False, runs=10, progress=False)
    assert len(result.trials) == 3  # the latency objective tries every candidate
    for trial in result.trials:
        assert trial.speedup is not None
        if trial.speedup <= 1.0:
            assert trial.reason.startswith("within budget but not faster") and not trial.accepted
    if result.met_budget:
        assert result.chosen.speedup > 1.0
    else:
        assert result.model is not None and result.recipe is None


def test_static_candidates_share_one_calibration(inputs):
    calibration = lowbit.calibrate(sensitive_mlp(), [inputs[:64]], progress=False)
    result = lowbit.tune(sensitive_mlp(), inputs, metric="agreement", max_drop=0.2,
                         candidates=["w8a8-static"], calibration=calibration, final_comparison=False,
                         progress=False)
    assert result.trials[0].recipe["scheme"] == "static" and result.trials[0].recipe["calibrator"] == "auto"
    assert result.to_dict()["trials"][0]["label"] == "w8a8-static"


def test_quantize_max_drop_falls_back_through_safer_recipes():
    assert safer_candidates("w4") == ["w8a8-static", "w8a8-dynamic", "w8", "fp16"]
    assert safer_candidates("w8a8-dynamic") == ["w8", "fp16"]
    assert safer_candidates("w4-g32")[0] == "w8a8-static"


def _factory_files(tmp_path, inputs):
    from safetensors.torch import save_file

    save_file(sensitive_mlp().state_dict(), tmp_path / "weights.safetensors")
    save_file({"inputs": inputs}, tmp_path / "data.safetensors")
    return ["tests.fixtures_models:sensitive_mlp", "--weights", str(tmp_path / "weights.safetensors"),
            "--data", str(tmp_path / "data.safetensors")]


def test_cli_tune_writes_the_model_and_reports(tmp_path, inputs):
    arguments = _factory_files(tmp_path, inputs)
    out, report = tmp_path / "tuned", tmp_path / "tune.json"
    result = CliRunner().invoke(app, ["tune", *arguments, "--metric", "agreement", "--max-drop", "0.05",
                                      "--candidates", "w4-g32,fp16", "--out", str(out), "--json", str(report),
                                      "--html", str(tmp_path / "tune.html")])
    assert result.exit_code == 0, result.output
    assert (out / "lowbit.json").is_file() and json.loads(report.read_text())["met_budget"]
    assert "<img" in (tmp_path / "tune.html").read_text()
    reloaded = lowbit.load(out, skeleton=sensitive_mlp())
    assert reloaded[2].spec.weight == "fp16"


def test_cli_budget_missed_exits_4_and_writes_nothing(tmp_path, inputs):
    arguments = _factory_files(tmp_path, inputs)
    out = tmp_path / "tuned"
    for command in (["tune", *arguments, "--metric", "agreement", "--max-drop", "0",
                     "--candidates", "w4-g32"],
                    ["quantize", *arguments, "--recipe", "fp16", "--metric", "sqnr", "--max-drop", "1"]):
        result = CliRunner().invoke(app, [*command, "--out", str(out)])
        assert result.exit_code == EXIT_BUDGET_MISSED, result.output
        assert not out.exists()


def test_cli_quantize_max_drop_needs_data(tmp_path):
    result = CliRunner().invoke(app, ["quantize", "tests.fixtures_models:sensitive_mlp", "--max-drop", "0.1",
                                      "--out", str(tmp_path / "q")])
    assert result.exit_code == 2 and "--data" in result.output


def test_a_time_budget_runs_a_safe_candidate_first_and_names_what_it_did_not_try():
    """A budget too short for more than one trial: w8 still runs (an answer exists), every other
    candidate is named as not tried with its reason and how to ask for it, and the final
    comparison is skipped and said so rather than overrun."""
    result = lowbit.tune(tiny_mlp().eval(), torch.randn(128, 64), metric="agreement", max_drop=0.1,
                         time_budget=1e-6, progress=False)
    assert [trial.label for trial in result.trials] == ["w8"]
    assert result.met_budget and result.chosen.label == "w8"
    assert "w4 (the time budget would run out first)" in result.message
    for name in ("w8a8-static", "w8a8-dynamic", "fp16"):  # no use: w8's weights are as small
        assert f"{name} (cannot be smaller than the chosen model" in result.message
    assert "--time-budget" in result.message and "--candidates w4." in result.message
    assert "final comparison was skipped" in result.message and result.comparison is None


def test_without_a_time_budget_the_order_is_aggressive_first():
    result = lowbit.tune(tiny_mlp().eval(), torch.randn(128, 64), metric="agreement", max_drop=1.0,
                         candidates=["w4", "w8"], final_comparison=False, progress=False)
    assert [trial.label for trial in result.trials] == ["w4"]
    assert "w8 (cannot be smaller than the chosen model" in result.message


def test_a_nested_fail_is_explained_in_the_tune_report(inputs):
    """A size tune that met its budget, whose chosen model the final comparison finds slower:
    the report says which part failed and why that does not contradict the choice."""
    from lowbit.report.tune import nested_fail_explained

    result = lowbit.tune(tiny_mlp().eval(), torch.randn(128, 64), metric="agreement", max_drop=0.1,
                         candidates=["w8"], progress=False)
    assert result.met_budget and result.comparison is not None
    for entry in result.comparison.quantized["latency_ms"].values():
        entry["timings_ms"] = [value * 10 for value in entry.get("timings_ms", [entry["p50"]])]
        entry["p50"] *= 10
    lines = nested_fail_explained(result)
    assert lines and "slower than the original" in lines[0] and "objective was size" in lines[0]
    assert lines[0] in result.to_markdown()


def test_latency_objective_times_each_runtime_and_keeps_the_faster_within_budget(minilm, wiki_sentences,
                                                                                 tmp_path):
    """w8a8-dynamic MiniLM: ONNX Runtime runs a sentence several times faster than PyTorch eager,
    so tune takes it there, after measuring the metric again in it; the result saves with it."""
    model, tokenizer, _ = minilm
    result = lowbit.tune(model, wiki_sentences[:32], metric="cosine", max_drop=0.01, objective="latency",
                         candidates=["w8a8-dynamic"], tokenizer=tokenizer, runs=10, final_comparison=False,
                         progress=False)
    trial = result.chosen
    assert result.met_budget and trial.runtime == "onnxruntime" and trial.accuracy_level == 0
    assert trial.speedup > 1.0 and trial.drop <= 0.01
    assert isinstance(result.runtime_model, lowbit.runtimes.onnxruntime.OnnxRuntimeModel)
    assert "ONNX Runtime" in result.message and "(ORT, level 0)" in result.to_markdown()
    assert result.to_dict()["runtime"] == "onnxruntime"
    folder = lowbit.save(result.model, tmp_path / "m", runtime=result.runtime,
                         accuracy_level=result.accuracy_level)
    assert json.loads((folder / "lowbit.json").read_text())["runtime"] == "onnxruntime"


def test_a_gptq_candidate_is_tried_and_rounded_by_gptq(minilm, wiki_sentences):
    """tune takes w4-gptq among its candidates: the trial's model is GPTQ's (rounded against the
    data's first samples, block by block), not round-to-nearest's."""
    model, tokenizer, _ = minilm
    candidate = lowbit.make_recipe("w4-gptq", granularity="group:128")
    result = lowbit.tune(model, wiki_sentences[:32], metric="cosine", max_drop=0.5, candidates=[candidate],
                         tokenizer=tokenizer, final_comparison=False, progress=False)
    assert result.met_budget and result.chosen.recipe["algorithm"] == "gptq"
    name = "encoder.layer.0.attention.self.query"
    rounded = result.model.get_submodule(name).quantized_weight().data
    nearest = lowbit.quantize(model, "w4", progress=False).get_submodule(name).quantized_weight().data
    assert not torch.equal(rounded, nearest)
