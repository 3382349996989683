import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from lowbit.evaluate.comparison import Comparison
from lowbit.evaluate.metrics import (
    accuracy,
    bootstrap_difference,
    macro_f1,
    mean_cosine,
    speedup_interval,
    sqnr_db,
    top1_agreement,
)
from lowbit.evaluate.tasks import MetricError, Task, collect_outputs, score_quality


class UniformLM(nn.Module):
    """Predicts every token of a vocabulary with equal probability."""

    def __init__(self, vocabulary: int) -> None:
        super().__init__()
        self.vocabulary = vocabulary

    def forward(self, input_ids, attention_mask=None):
        logits = torch.zeros(*input_ids.shape, self.vocabulary)
        return type("Output", (), {"logits": logits})()


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    batch = {"input_ids": torch.randint(0, 50, (2, 33)), "labels": torch.randint(0, 50, (2, 33))}
    batch["labels"][0, :5] = -100
    outputs = collect_outputs(UniformLM(50), [batch], Task("causal_lm"))
    result = score_quality(Task("causal_lm"), outputs, outputs)["perplexity"]
    assert result["original"] == pytest.approx(50.0, rel=1e-6)
    assert result["delta"] == 0.0


def test_sqnr_of_identical_tensors_is_infinite_and_survives_json():
    x = torch.randn(10, 4)
    assert sqnr_db(x, x) == math.inf
    assert sqnr_db(x, x + 0.1 * x) == pytest.approx(20.0, abs=1e-6)
    quality = score_quality(Task("tensor"), x, x)
    comparison = Comparison({"latency_ms": {}}, {"latency_ms": {}}, quality, "sqnr")
    assert json.loads(comparison.to_json())["quality"]["sqnr"]["quantized"] == "inf"


def test_accuracy_f1_and_agreement_on_known_answers():
    labels = np.array([0, 0, 1, 1])
    predictions = np.array([0, 1, 1, 1])
    assert accuracy(predictions, labels) == 0.75
    # class 0: precision 1, recall 0.5 -> 2/3; class 1: precision 2/3, recall 1 -> 0.8
    assert macro_f1(predictions, labels) == pytest.approx((2 / 3 + 0.8) / 2)
    logits = torch.tensor([[2.0, 1.0], [0.0, 1.0]])
    assert top1_agreement(logits, logits.flip(1)) == 0.0
    assert mean_cosine(logits, 3 * logits) == pytest.approx(1.0)


def test_bootstrap_interval_brackets_the_change_and_is_zero_for_identical_models():
    rng = np.random.default_rng(0)
    original, quantized = rng.random(200), rng.random(200) - 0.1
    delta, low, high = bootstrap_difference(200, lambda i: (original[i].mean(), quantized[i].mean()))
    assert low <= delta <= high and high < 0
    assert bootstrap_difference(50, lambda i: (1.0, 1.0)) == (0.0, 0.0, 0.0)


def test_classification_metrics_need_labels():
    logits = torch.randn(6, 3)
    task = Task("logits")
    assert set(score_quality(task, logits, logits)) == {"agreement", "sqnr"}
    with pytest.raises(MetricError, match="needs labels"):
        score_quality(task, logits, logits, metrics=["accuracy"])


def test_labelled_classification_scores_accuracy_with_an_interval():
    labels = np.array([0, 1, 2, 0, 1, 2])
    original = torch.nn.functional.one_hot(torch.tensor(labels), 3).float()
    quantized = original.clone()
    quantized[0] = torch.tensor([0.0, 1.0, 0.0])
    result = score_quality(Task("logits", labels=labels), original, quantized)
    assert result["accuracy"]["original"] == 1.0
    assert result["accuracy"]["quantized"] == pytest.approx(5 / 6)
    assert result["agreement"]["quantized"] == pytest.approx(5 / 6)


def test_unknown_metric_is_an_error():
    with pytest.raises(MetricError, match="unknown metric"):
        score_quality(Task("tensor"), torch.ones(2, 2), torch.ones(2, 2), metrics=["bleu"])


def test_verdict_marks_a_slower_model_as_a_failure():
    quality = {"accuracy": {"original": 0.9, "quantized": 0.89, "delta": -0.01, "ci95": [-0.02, 0.0],
                            "higher_is_better": True}}
    fast = {"latency_ms": {"1": {"p50": 10.0}, "8": {"p50": 50.0}}}
    slow = {"latency_ms": {"1": {"p50": 8.0}, "8": {"p50": 60.0}}}
    verdict = Comparison(fast, slow, quality, "accuracy", max_drop=0.02).verdict()
    assert verdict["speed"]["1"]["faster"] and verdict["speed"]["8"]["slower"]
    assert verdict["within_budget"] and not verdict["passed"]
    assert Comparison(fast, fast, quality, "accuracy", max_drop=0.005).verdict()["within_budget"] is False


def test_relative_budget_for_perplexity_counts_an_increase_as_a_drop():
    quality = {"perplexity": {"original": 10.0, "quantized": 10.3, "delta": 0.3, "ci95": [0.2, 0.4],
                              "higher_is_better": False}}
    same = {"latency_ms": {}}
    assert Comparison(same, same, quality, "perplexity", max_drop=0.02, relative=True).verdict()[
        "within_budget"] is False
    assert Comparison(same, same, quality, "perplexity", max_drop=0.05, relative=True).verdict()[
        "within_budget"] is True


def _timed(p50: float, timings: list[float]) -> dict:
    return {"latency_ms": {"1": {"p50": p50, "timings_ms": timings}}}


def test_a_speed_difference_inside_the_noise_is_a_tie_not_a_failure():
    noise = np.random.default_rng(1).normal(0, 1.0, 40)
    original, quantized = list(20 + noise), list(20.2 + noise[::-1])
    verdict = Comparison(_timed(np.median(original), original), _timed(np.median(quantized), quantized),
                         {}, "cosine").verdict()
    entry = verdict["speed"]["1"]
    assert entry["ci95"][0] < 1.0 < entry["ci95"][1]
    assert not entry["faster"] and not entry["slower"] and verdict["passed"]
    assert "within noise" in verdict["lines"][0]


def test_a_consistently_slower_model_fails_even_by_a_few_percent():
    noise = np.random.default_rng(2).normal(0, 0.1, 40)
    original, quantized = list(20 + noise), list(21 + noise)
    verdict = Comparison(_timed(20.0, original), _timed(21.0, quantized), {}, "cosine").verdict()
    assert verdict["speed"]["1"]["slower"] and not verdict["passed"]


def test_speedup_interval_is_paired_over_interleaved_runs():
    drift = np.linspace(10, 30, 50)  # outside load that slows both models alike
    low, high = speedup_interval(list(drift * 1.5), list(drift))
    assert 1.45 < low <= high < 1.55


def test_quality_counts_in_the_verdict_without_a_budget():
    """An agreement of 0.26 fails the verdict even when no --max-drop was given: the default
    budget (1% relative) applies, and the line says it was the default."""
    poor = {"agreement": {"original": 1.0, "quantized": 0.26, "delta": -0.74, "ci95": [-0.8, -0.7],
                          "higher_is_better": True}}
    close = {"agreement": {"original": 1.0, "quantized": 0.995, "delta": -0.005,
                           "ci95": [-0.01, 0.0], "higher_is_better": True}}
    same = {"latency_ms": {}}
    verdict = Comparison(same, same, poor, "agreement").verdict()
    assert verdict["within_budget"] is False and not verdict["passed"]
    assert "default budget" in verdict["lines"][-1]
    assert Comparison(same, same, close, "agreement").verdict()["passed"]
