"""Model files in and out: read a user's pickle / joblib (only when trusted) or skops file, write
the lowbit file, and measure both side by side."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from lowbit.core.timing import timed
from lowbit.errors import FormatError, LowbitError
from lowbit.evaluate.latency import measure_latencies
from lowbit.families.sklearn.guard import differences as count_differences
from lowbit.families.sklearn.guard import predictions
from lowbit.families.sklearn.lowbit_file import read_file

PICKLE_SUFFIXES = (".joblib", ".pkl", ".pickle")
SKOPS_SUFFIXES = (".skops",)
SKLEARN_SUFFIXES = PICKLE_SUFFIXES + SKOPS_SUFFIXES
SKOPS_TRUSTED = ("sklearn.", "numpy.", "scipy.sparse.", "builtins.", "collections.")


def is_sklearn_file(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in SKLEARN_SUFFIXES


def load_skops_safely(data: bytes) -> Any:
    """skops.io.load trusting only scikit-learn, numpy and builtin types."""
    import skops.io

    try:
        untrusted = skops.io.get_untrusted_types(data=data)
    except Exception as error:  # noqa: BLE001 - a corrupt zip or schema fails in many ways
        raise FormatError(f"not a readable skops file: {type(error).__name__}: {error}") from None
    foreign = [name for name in untrusted if not name.startswith(SKOPS_TRUSTED)]
    if foreign:
        raise FormatError(f"the model holds types outside scikit-learn and numpy: {', '.join(foreign[:5])}")
    return skops.io.loads(data, trusted=untrusted)


def read_estimator(path: str | os.PathLike, trust_pickle: bool = False) -> Any:
    """The estimator in a skops file (loaded safely), or in a pickle / joblib file when the
    caller trusts it: unpickling runs arbitrary code, so it is never done implicitly."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path} does not exist")
    suffix = path.suffix.lower()
    if suffix in SKOPS_SUFFIXES:
        return load_skops_safely(path.read_bytes())
    if suffix not in PICKLE_SUFFIXES:
        raise FormatError(f"{path}: expected a .joblib, .pkl, .pickle or .skops file")
    if not trust_pickle:
        raise LowbitError(f"{path} is a pickle: loading it runs any code it holds. Pass --trust-pickle "
                          "(trust_pickle=True) if you trust where it came from, or save it with skops")
    import joblib

    try:
        return joblib.load(path)
    except Exception as error:  # noqa: BLE001 - a corrupt or truncated pickle fails in many ways
        raise FormatError(f"cannot read {path}: {type(error).__name__}: {error}") from None


def reference_inputs(data: Any, estimator: Any = None) -> Any:
    """Inputs for predict from a data file (texts, or a numeric array) or an in-memory object.

    A CSV file for an estimator fitted on a DataFrame (it has `feature_names_in_`) is read as a
    DataFrame of those columns, so named and non-numeric columns reach a ColumnTransformer.
    """
    if data is None or not isinstance(data, (str, os.PathLike)):
        return data
    names = getattr(estimator, "feature_names_in_", None)
    if names is not None and Path(data).suffix.lower() == ".csv":
        return _named_columns(Path(data), list(names))
    from lowbit.data.datasets import read_dataset

    dataset = read_dataset(data)
    inputs = dataset.texts if dataset.texts is not None else dataset.inputs.numpy()
    _check_kind(inputs, estimator, Path(data))
    return inputs


def _check_kind(inputs: Any, estimator: Any, path: Path) -> None:
    """Text for a model whose first step reads text, numbers for the others: a clear error (never
    the data itself pasted into the message) when the file holds the other kind."""
    from lowbit.families.sklearn.probe import TEXT_VECTORIZERS, first_step

    if estimator is None:
        return
    first = first_step(estimator)
    step, texts = type(first).__name__, isinstance(inputs, list)
    if step in TEXT_VECTORIZERS and not texts:
        raise LowbitError(f"the model reads text (its first step is a {step}), but {path.name} holds "
                          "numbers; give texts as .jsonl ({\"text\": ...} per line) or .txt (one per line)")
    numeric = getattr(first, "n_features_in_", None) is not None  # not a union of vectorizers
    if step not in TEXT_VECTORIZERS and texts and numeric:
        width = getattr(estimator, "n_features_in_", None)
        columns = f"{width} numeric columns" if width else "numbers"
        raise LowbitError(f"the model takes {columns} ({step}), but {path.name} holds text; give "
                          ".npy or .csv numbers")


def reference_labels(data: str | os.PathLike) -> np.ndarray | None:
    """The "label" column or field of a data file, as read (a CSV's labels are text)."""
    path = Path(data)
    if path.suffix.lower() == ".csv":
        from lowbit.data.datasets import read_text

        rows = list(csv.DictReader(io.StringIO(read_text(path), newline="")))
        return np.asarray([row["label"] for row in rows]) if rows and "label" in rows[0] else None
    from lowbit.data.datasets import read_dataset

    return read_dataset(path).labels


def _named_columns(path: Path, names: list[str]) -> Any:
    try:
        import pandas
    except ImportError:
        raise LowbitError("the model was fitted on a DataFrame: reading its CSV data needs pandas "
                          "(pip install pandas)") from None
    try:
        frame = pandas.read_csv(path)
    except (OSError, ValueError) as error:
        raise FormatError(f"cannot read {path}: {error}") from None
    missing = [name for name in names if name not in frame.columns]
    if missing:
        raise LowbitError(f"{path} lacks columns the model was fitted on: {', '.join(missing[:10])}")
    return frame[names]


LOAD_ROUNDS = (5, 51)  # fewest and most rounds of loads timed in turn
LOAD_BUDGET_SECONDS = 2.0  # about how long the timed rounds take together


def median_load_seconds(loads: dict[str, Callable[[], Any]]) -> dict[str, tuple[Any, float]]:
    """Each name's (model, median load seconds), the files loaded in turn, round after round,
    so the machine's other work hits each alike (one load alone is at the mercy of the disk
    cache; a millisecond file gets 51 rounds, a 100 ms one about 10)."""
    if not loads:
        return {}
    first = {name: timed(load) for name, load in loads.items()}  # warm-up, and the models
    per_round = max(sum(seconds for _, seconds in first.values()), 1e-6)
    rounds = int(min(max(LOAD_BUDGET_SECONDS / per_round, LOAD_ROUNDS[0]), LOAD_ROUNDS[1]))
    stats = measure_latencies(loads, runs=rounds, warmup=0)
    return {name: (model, stats[name].p50 / 1000.0) for name, (model, _) in first.items()}


def predictions_per_second(models: dict[str, Any], inputs: Any, runs: int = 10) -> dict[str, float | None]:
    """Samples per second of `predict` on all of `inputs`, at the median of `runs` calls; the
    models are timed interleaved, so outside load hits each alike."""
    if inputs is None:
        return dict.fromkeys(models)
    calls = {name: (lambda model=model: model.predict(inputs)) for name, model in models.items()}
    return {name: len(inputs) / (stats.p50 / 1000.0)
            for name, stats in measure_latencies(calls, runs=runs, warmup=1).items()}


def measure_files(original_path: Path, quantized_path: Path, original: Any, inputs: Any,
                  trust_pickle: bool) -> dict[str, Any]:
    """Sizes, load times (medians, loaded in turn) and predict throughput of both files."""
    loads = median_load_seconds({"original": lambda: read_estimator(original_path, trust_pickle),
                                 "quantized": lambda: read_file(quantized_path)})
    (loaded_original, original_seconds), (loaded, quantized_seconds) = loads["original"], loads["quantized"]
    original_size, quantized_size = original_path.stat().st_size, quantized_path.stat().st_size
    differences = None
    if inputs is not None:
        differences = count_differences(predictions(original, inputs), predictions(loaded, inputs)).changed
    speed = predictions_per_second({"original": loaded_original, "quantized": loaded}, inputs)
    return {
        "original_size_bytes": original_size, "quantized_size_bytes": quantized_size,
        "file_size_reduction_percent": 100.0 * (1 - quantized_size / original_size),
        "prediction_differences": differences,
        "original_load_seconds": original_seconds, "quantized_load_seconds": quantized_seconds,
        "original_predictions_per_second": speed["original"],
        "quantized_predictions_per_second": speed["quantized"],
    }
