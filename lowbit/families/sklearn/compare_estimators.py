"""`lowbit compare` for scikit-learn models: the same `Comparison` report as for networks.

Quality: agreement with the original's predictions (and accuracy, or R² for regressors, when
the data has labels), each with a paired bootstrap interval. Speed: `predict` latency at each
batch size, the two models timed interleaved. Size: the two files. Load time: the median of
loads of each file in this process, the files loaded in turn. "Layers": every quantized array,
worst SQNR first, with its encoding, so a difference can be traced to the array that caused it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lowbit.errors import LowbitError
from lowbit.evaluate.comparison import Comparison
from lowbit.evaluate.latency import measure_latencies, under_machine_load
from lowbit.evaluate.metrics import bootstrap_difference, sqnr_db
from lowbit.families.sklearn.estimator_files import is_sklearn_file, median_load_seconds, read_estimator
from lowbit.families.sklearn.guard import same_predictions, take_rows
from lowbit.families.sklearn.lowbit_file import is_lowbit_file, read_file
from lowbit.families.sklearn.slots import find_slots

EstimatorLike = Any  # a fitted estimator, a QuantizedEstimator, or a path to a model file


def is_sklearn_model(model: Any) -> bool:
    """Whether `model` is a scikit-learn estimator or a file that holds one."""
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        return is_sklearn_file(path) or path.suffix == ".lowbit" or (path.is_file() and is_lowbit_file(path))
    return type(model).__module__.startswith(("sklearn", "lowbit.families.sklearn"))


def _loader(path: Path, trust_pickle: bool) -> Callable[[], Any]:
    if path.suffix == ".lowbit" or is_lowbit_file(path):
        return lambda: read_file(path)
    return lambda: read_estimator(path, trust_pickle)


Opened = tuple[Any, str | None, float | None]  # (estimator, its path, its load seconds)


def _open(models: dict[str, EstimatorLike], trust_pickle: bool) -> dict[str, Opened]:
    """Each name's (estimator, its path, its median load seconds) for estimators or files; the
    files are loaded in turn, round after round (median_load_seconds)."""
    paths = {name: Path(model) for name, model in models.items() if isinstance(model, (str, os.PathLike))}
    loaded = median_load_seconds({name: _loader(path, trust_pickle) for name, path in paths.items()})
    return {name: (loaded[name][0], str(paths[name]), loaded[name][1]) if name in paths else
            (getattr(model, "estimator_", model), None, None) for name, model in models.items()}


def _quality(original: Any, quantized: Any, inputs: Any, labels: np.ndarray | None) -> dict[str, dict]:
    """agreement always; accuracy (classifiers) or r2 (regressors) against labels when given."""
    before, after = np.asarray(original.predict(inputs)), np.asarray(quantized.predict(inputs))
    regressor = np.issubdtype(before.dtype, np.floating) and not hasattr(original, "classes_")
    same = same_predictions(before, after)
    scores: dict[str, Callable[[np.ndarray], tuple[float, float]]] = {
        "agreement": lambda idx: (1.0, float(same[idx].mean()))}
    if labels is not None and regressor:
        truth = labels.astype(float)

        def r2(predicted: np.ndarray, idx: np.ndarray) -> float:
            spread = np.sum((truth[idx] - truth[idx].mean()) ** 2)
            return float(1 - np.sum((truth[idx] - predicted[idx]) ** 2) / spread) if spread else math.nan

        scores["r2"] = lambda idx: (r2(before, idx), r2(after, idx))
    elif labels is not None:
        expected = _as_predictions(labels, before.dtype)
        scores["accuracy"] = lambda idx: (float((before[idx] == expected[idx]).mean()),
                                          float((after[idx] == expected[idx]).mean()))
    results = {}
    for name, score in scores.items():
        first, second = score(np.arange(len(before)))
        delta, low, high = bootstrap_difference(len(before), score)
        results[name] = {"original": first, "quantized": second, "delta": delta, "ci95": [low, high],
                         "higher_is_better": True}
    return results


def _as_predictions(labels: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Labels in the type the model predicts (a CSV's labels arrive as text)."""
    try:
        return labels.astype(dtype)
    except ValueError:
        return labels.astype(str)


def array_errors(original: Any, quantized: Any, encodings: dict[str, str] | None = None) -> list[dict]:
    """Per float array: SQNR of the quantized values against the original's, worst first."""
    reference = {slot.path: slot.get() for slot in find_slots(original)}
    rows = []
    for slot in find_slots(quantized):
        if slot.path not in reference or reference[slot.path].shape != slot.get().shape:
            continue
        encoding = (encodings or {}).get(slot.path, "unknown")
        rows.append({"name": slot.path, "sqnr_db": sqnr_db(reference[slot.path], slot.get()),
                     "scheme": encoding, "weight": str(slot.get().dtype),
                     "granularity": "per row" if encoding.endswith("-rows") else "whole array",
                     "kernel": "scikit-learn"})
    return sorted(rows, key=lambda row: row["sqnr_db"])


def _latency(models: dict[str, Any], inputs: Any, batch_sizes: Sequence[int], runs: int,
             threads: int | None) -> dict[str, dict[str, dict[str, Any]]]:
    """{model: {batch size: p50/p95/p99/mean, timings, throughput}} of predict, timed interleaved."""
    results: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in models}
    for size in batch_sizes:
        if size > len(inputs):
            raise LowbitError(f"batch size {size} needs at least {size} samples; the data has {len(inputs)}")
        batch = take_rows(inputs, np.arange(size))
        calls = {name: (lambda model=model, batch=batch: model.predict(batch))
                 for name, model in models.items()}
        stats = measure_latencies(calls, runs=runs, threads=threads)
        for name, entry in stats.items():
            results[name][str(size)] = {**entry.to_dict(), "throughput": size / (entry.p50 / 1000.0)}
    return results


def compare_estimators(
    original: EstimatorLike, quantized: EstimatorLike, data: Any, labels: np.ndarray | None = None,
    metric: str | None = None, batch_sizes: Sequence[int] = (1, 8), max_drop: float | None = None,
    relative: bool = False, samples: int | None = None, runs: int = 20, threads: int | None = None,
    trust_pickle: bool = False,
) -> Comparison:
    """Measure a quantized scikit-learn model against its original on `data` (a data file,
    texts, or an array; a file's labels are used when `labels` is not given)."""
    from lowbit.families.sklearn.estimator_files import reference_inputs, reference_labels

    opened = _open({"original": original, "quantized": quantized}, trust_pickle)
    (original_model, original_path, original_seconds) = opened["original"]
    (quantized_model, quantized_path, quantized_seconds) = opened["quantized"]
    if isinstance(data, (str, os.PathLike)) and labels is None:
        labels = reference_labels(data)
    inputs = reference_inputs(data, original_model)
    available = len(inputs)
    if samples:
        inputs, labels = take_rows(inputs, np.arange(min(samples, len(inputs)))), (
            None if labels is None else labels[:samples])
    try:
        quality = _quality(original_model, quantized_model, inputs, labels)
    except ValueError as error:
        raise LowbitError(f"the data does not fit the model: {error}") from None
    metric = metric or ("accuracy" if "accuracy" in quality else "agreement")
    if metric not in quality:
        raise LowbitError(f"metric {metric!r} is not measured for this model and data; "
                          f"choose one of {', '.join(quality)}")
    latency, load = under_machine_load(lambda: _latency(
        {"original": original_model, "quantized": quantized_model}, inputs, batch_sizes, runs, threads))
    encodings = _encodings(quantized, quantized_path)
    reports = {}
    for name, path, seconds in (("original", original_path, original_seconds),
                                ("quantized", quantized_path, quantized_seconds)):
        reports[name] = {
            "source": path, "size_bytes": Path(path).stat().st_size if path else None, "param_bytes": None,
            "peak_rss_bytes": None, "load_seconds": seconds,
            "latency_ms": {size: {k: v for k, v in entry.items() if k != "throughput"}
                           for size, entry in latency[name].items()},
            "throughput": {size: entry["throughput"] for size, entry in latency[name].items()},
            "quality": {m: entry[name] for m, entry in quality.items()}}
    settings = {"kind": f"scikit-learn {type(original_model).__name__}", "samples": len(inputs),
                "available_samples": available, **load,
                "batch_sizes": list(batch_sizes), "quality_batch_size": len(inputs), "runs": runs,
                "threads": threads}
    return Comparison(reports["original"], reports["quantized"], quality, metric,
                      array_errors(original_model, quantized_model, encodings), settings, max_drop, relative)


def _encodings(quantized: Any, path: str | None) -> dict[str, str] | None:
    """How each array of the quantized model is stored, from its file or its report."""
    if path:
        from lowbit.families.sklearn.lowbit_file import read_manifest

        return read_manifest(path).get("report", {}).get("encodings")
    return quantized.report().get("encodings") if hasattr(quantized, "report") else None


def bench_estimator(model: EstimatorLike, data: Any, batch_sizes: Sequence[int] = (1, 8), runs: int = 20,
                    threads: int | None = None, trust_pickle: bool = False) -> dict[str, Any]:
    """`lowbit bench` for one scikit-learn model: predict latency and throughput per batch size
    on `data`, size on disk and load time (median of loads in turn)."""
    from lowbit.families.sklearn.estimator_files import reference_inputs

    if data is None:
        raise LowbitError("a scikit-learn model needs --data: inputs to time predict on")
    estimator, path, seconds = _open({"model": model}, trust_pickle)["model"]
    inputs = reference_inputs(data, estimator)
    try:
        latency = _latency({"model": estimator}, inputs, batch_sizes, runs, threads)["model"]
    except ValueError as error:
        raise LowbitError(f"the data does not fit the model: {error}") from None
    return {"source": path, "kind": f"scikit-learn {type(estimator).__name__}", "latency_ms": latency,
            "size_bytes": Path(path).stat().st_size if path else None, "param_bytes": None,
            "peak_rss_bytes": None, "load_seconds": seconds, "threads": threads}
