"""What a model is asked to do on the data, and how each quality metric is scored.

A task runs a model over prepared batches (tensors or dicts of tensors, already tokenized) and
returns per-sample outputs; `score_quality` then compares the original's and the quantized
model's outputs on the same samples. Kinds:
  embedding  mean-pooled last hidden state (sentence encoders): cosine
  logits     class scores (classifiers, any model returning a 2-D tensor): accuracy, macro-F1
             with labels; top-1 agreement and logit SQNR always
  causal_lm  next-token negative log-likelihood over sliding windows: perplexity
  tensor     any other output tensor: SQNR and cosine
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.data.batches import call_model, primary_tensor
from lowbit.errors import LowbitError
from lowbit.evaluate.metrics import (
    accuracy,
    bootstrap_difference,
    cosine_per_sample,
    macro_f1,
    sqnr_db,
)

HIGHER_IS_BETTER = {"accuracy": True, "f1": True, "cosine": True, "agreement": True, "sqnr": True,
                    "perplexity": False}
METRICS_BY_KIND = {
    "embedding": ("cosine",),
    "logits": ("accuracy", "f1", "agreement", "sqnr"),
    "causal_lm": ("perplexity",),
    "tensor": ("sqnr", "cosine"),
}


class MetricError(LowbitError):
    """A metric that does not fit the model's outputs or the data (e.g. accuracy without labels)."""


@dataclass
class Task:
    """The kind of output to collect, plus labels for classification."""

    kind: str
    labels: np.ndarray | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def metrics(self) -> tuple[str, ...]:
        names = METRICS_BY_KIND[self.kind]
        if self.kind == "logits" and self.labels is None:
            names = tuple(n for n in names if n not in ("accuracy", "f1"))
        return names



def is_transformers_model(model: object) -> bool:
    """A Hugging Face transformers model (it has a config and can save itself)."""
    return hasattr(model, "config") and hasattr(model, "save_pretrained")

def mean_pooled_embedding(model: nn.Module, batch: dict) -> torch.Tensor:
    """Sentence embedding: attention-mask-weighted mean of the last hidden state."""
    hidden = call_model(model, batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def _window_nll(model: nn.Module, batch: dict) -> torch.Tensor:
    """[sum of NLL, predicted tokens] per sequence; `labels` of -100 are not scored."""
    logits = call_model(model, {k: v for k, v in batch.items() if k != "labels"}).logits.float()
    labels = batch["labels"][:, 1:]
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels, reduction="none",
                             ignore_index=-100)
    counted = (labels != -100).sum(dim=1)
    return torch.stack([losses.sum(dim=1).double(), counted.double()], dim=1)


def collect_outputs(model: nn.Module, batches: Iterable[Any], task: Task) -> torch.Tensor:
    """Per-sample outputs of `model` on every batch, concatenated along the first dimension."""
    chunks = []
    with torch.inference_mode():
        for batch in batches:
            if task.kind == "embedding":
                chunks.append(mean_pooled_embedding(model, batch).float())
            elif task.kind == "causal_lm":
                chunks.append(_window_nll(model, batch))
            else:
                tensor = primary_tensor(call_model(model, batch)).float()
                chunks.append(tensor if tensor.dim() > 1 else tensor.unsqueeze(1))
    if not chunks:
        raise MetricError("the data produced no batches")
    return torch.cat(chunks)


def _scorer(metric: str, reference: torch.Tensor, candidate: torch.Tensor, labels):
    """score(indices) -> (original value, quantized value) for one metric."""
    if metric == "cosine":
        per_sample = cosine_per_sample(reference, candidate).numpy()
        return lambda idx: (1.0, float(per_sample[idx].mean()))
    if metric == "sqnr":
        return lambda idx: (math.inf, sqnr_db(reference[idx], candidate[idx]))
    if metric == "perplexity":
        ref, cand = reference.numpy(), candidate.numpy()

        def score(idx):
            tokens = max(ref[idx, 1].sum(), 1.0)
            return math.exp(ref[idx, 0].sum() / tokens), math.exp(cand[idx, 0].sum() / tokens)

        return score
    ref_pred, cand_pred = reference.argmax(-1).numpy(), candidate.argmax(-1).numpy()
    if metric == "agreement":
        same = (ref_pred == cand_pred).astype(np.float64)
        return lambda idx: (1.0, float(same[idx].mean()))
    if labels is None:
        raise MetricError(f"metric {metric!r} needs labels in the data (a \"label\" field)")
    if len(labels) != len(ref_pred):
        raise MetricError(f"the data has {len(labels)} labels for {len(ref_pred)} samples")
    function = accuracy if metric == "accuracy" else macro_f1
    return lambda idx: (function(ref_pred[idx], labels[idx]), function(cand_pred[idx], labels[idx]))


def score_quality(
    task: Task, reference: torch.Tensor, candidate: torch.Tensor, metrics: Iterable[str] | None = None,
    resamples: int = 1000,
) -> dict[str, dict[str, float]]:
    """For each metric: original, quantized, delta (quantized − original) and its 95% interval."""
    results = {}
    for metric in metrics or task.metrics():
        if metric not in HIGHER_IS_BETTER:
            raise MetricError(f"unknown metric {metric!r}; choose one of {', '.join(HIGHER_IS_BETTER)}")
        if metric not in METRICS_BY_KIND[task.kind]:
            raise MetricError(
                f"metric {metric!r} does not apply to a {task.kind} model; "
                f"use one of {', '.join(task.metrics())}"
            )
        score = _scorer(metric, reference, candidate, task.labels)
        original, quantized = score(np.arange(len(reference)))
        delta, low, high = bootstrap_difference(len(reference), score, resamples=resamples)
        results[metric] = {"original": original, "quantized": quantized, "delta": delta,
                           "ci95": [low, high], "higher_is_better": HIGHER_IS_BETTER[metric]}
    return results
