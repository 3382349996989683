"""The public entry points that take a model from any family — `lowbit.load`, `save`, `compare`,
`bench` and `tune` — each handed to the family that claims it (lowbit.families.registry)."""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from lowbit.evaluate.compare_models import Settings
from lowbit.evaluate.comparison import Comparison
from lowbit.families.batch import BatchResult, run_batch
from lowbit.families.fallback import load_with_fallback
from lowbit.families.registry import family_of
from lowbit.families.torch_family import ModelLike, model_tokenizer, open_model
from lowbit.families.torch_folders import Skeleton
from lowbit.families.torch_folders import save as save_torch
from lowbit.tune.search import TuneResult
from lowbit.tune.search import tune as tune_module


def load(path: str | os.PathLike, skeleton: Skeleton = None, trust_code: bool = False,
         runtime: str | None = None, fallback: Any = None, smoke_input: Any = None,
         trust_pickle: bool = False) -> Any:
    """A saved lowbit model: a folder (a torch module, see lowbit.families.torch_folders.load) or
    a scikit-learn .lowbit file (the estimator, rebuilt without pickle). `trust_code` lets a
    folder's manifest name a `module:factory` to import; nothing else a file names is imported.
    `runtime` ("torch" or "onnxruntime") runs a folder in another runtime than it records.

    `fallback` (the original: a model, or a path or spec lowbit opens; a pickle only with
    `trust_pickle`) is served instead when the quantized model cannot load, needs a kernel this
    machine lacks, or fails one batch (`smoke_input`, or one lowbit makes), with the reason
    logged and warned; the model returned says which it is (lowbit.families.fallback)."""
    options = {"skeleton": skeleton, "trust_code": trust_code, **({"runtime": runtime} if runtime else {})}
    if fallback is None:
        return family_of(path).load(path, **options)
    return load_with_fallback(path, fallback, lambda: family_of(path).load(path, **options), smoke_input,
                              trust_pickle, trust_code)


def save(model: nn.Module, path: str | os.PathLike, overwrite: bool = False, runtime: str = "auto",
         accuracy_level: int = 0, activation_block: int | None = None) -> Path:
    """Save a quantized torch model as a lowbit folder: atomic, checksummed, no pickle. (A
    quantized scikit-learn model saves itself: `QuantizedEstimator.save(path)`.)

    `runtime` is what `lowbit.load` will run: "auto" (the default: both timed here, the faster
    kept and lowbit.json says why; a model that cannot be exported stays in PyTorch), "eager"
    or "torch" (PyTorch), or "onnxruntime" (the folder also holds model.onnx, which plain ONNX
    Runtime runs without lowbit or torch, its weights kept once in lowbit's tensor file). For
    ONNX Runtime, `accuracy_level` 4 quantizes activations to int8 per MatMulNBits block, and
    `activation_block` (16, 32, 64, 128) caps that block."""
    return save_torch(model, path, overwrite, runtime, accuracy_level, activation_block)


def compare(
    original: Any,
    quantized: Any,
    data: Any,
    metric: str | None = None,
    batch_sizes: Sequence[int] = (1, 8),
    max_drop: float | None = None,
    relative: bool = False,
    samples: int | None = 256,
    seq_len: int = 128,
    runs: int = 20,
    threads: int | None = None,
    tokenizer: Any = None,
    memory: bool = True,
    progress: bool = True,
    trust_pickle: bool = False,
    trust_code: bool = False,
    fallback: bool = False,
) -> Comparison:
    """Measure `quantized` against `original` on `data` (a file, texts, or a tensor).

    `metric` picks the headline quality metric (default: the first for the model kind: cosine
    for encoders, accuracy or agreement for classifiers, perplexity for causal LMs, agreement or
    R² for scikit-learn); every metric of the kind is measured anyway. `max_drop` is the quality
    budget (absolute, or a fraction of the original's value with `relative=True`). `trust_pickle`
    allows reading a scikit-learn .joblib/.pkl original; `trust_code` lets a lowbit folder's
    manifest name a `module:factory` to import (see `load`). With `fallback`, a quantized model
    that cannot serve (see `load`) gives way to the original, which is measured in its place; the
    report says so and why.
    """
    settings = Settings(metric, batch_sizes, max_drop, relative, samples, seq_len, runs, threads)
    served = _served(quantized, original, fallback, trust_pickle, trust_code)
    comparison = family_of(original, quantized).compare(
        original, quantized if served is None else served, data, settings, tokenizer=tokenizer, memory=memory,
        progress=progress, trust_pickle=trust_pickle, trust_code=trust_code)
    comparison.quantized.update(_served_entry(served))
    return comparison


def _served(quantized: Any, original: Any, fallback: bool, trust_pickle: bool, trust_code: bool) -> Any:
    """With `fallback`, the original when the quantized model at a path cannot serve; None when it
    can (it is measured from its path, as without `fallback`) or when no fallback is asked."""
    if not fallback or not isinstance(quantized, (str, os.PathLike)):
        return None
    served = load(quantized, trust_code=trust_code, fallback=original, trust_pickle=trust_pickle)
    return served if served.lowbit_served == "original" else None


def _served_entry(served: Any) -> dict[str, Any]:
    if served is None:
        return {}
    return {"served": "original", "fallback_reason": served.lowbit_fallback_reason}


def bench(
    model: Any,
    batch_sizes: Sequence[int] = (1, 8),
    seq_len: int = 128,
    runs: int = 20,
    threads: int | None = None,
    data: Any = None,
    memory: bool = True,
    trust_pickle: bool = False,
    trust_code: bool = False,
    fallback: Any = None,
) -> dict[str, Any]:
    """Latency, throughput, size, memory and load time of one model. Text models get
    `seq_len`-token inputs made from `data` (or a fixed English paragraph); tensor and
    scikit-learn models need `data`. `fallback` (the original) is measured instead when the
    model cannot serve (see `load`); the report says so and why."""
    served = _served(model, fallback, fallback is not None, trust_pickle, trust_code)
    measured = model if served is None else fallback
    report = family_of(measured).bench(measured, batch_sizes=batch_sizes, seq_len=seq_len, runs=runs,
                                       threads=threads, data=data, memory=memory, trust_pickle=trust_pickle,
                                       trust_code=trust_code)
    return {**report, **_served_entry(served)}


@functools.wraps(tune_module)
def tune(model: ModelLike, data: Any, *args: Any, tokenizer: Any = None, trust_code: bool = False,
         **options: Any) -> TuneResult:
    """lowbit.tune.search.tune on a torch model or a path to one (its tokenizer is found beside it)."""
    module, path = open_model(model, trust_code)
    tokenizer = tokenizer or model_tokenizer(module, path)
    return tune_module(module, data, *args, tokenizer=tokenizer, **options)


def batch(source: str | os.PathLike, out: str | os.PathLike, **options: Any) -> BatchResult:
    """Every model in the folder `source` quantized into `out` (and compared where data is given),
    failures kept in their rows, reruns resuming; see lowbit.families.batch.run_batch."""
    return run_batch(source, out, **options)
