"""lowbit for scikit-learn: quantize fitted estimators and pipelines with zero prediction change.

    q = lowbit.sklearn.quantize(pipeline, bits=8, data=X_check)   # guarded on X_check
    q.predict(X); q.save("model.lowbit"); lowbit.sklearn.load("model.lowbit")

Every float array (coefficients, log-probabilities, scaler statistics, support vectors, network
weights, tree thresholds and values) takes the smallest encoding on its ladder (int8 or int16
rows with a scale, float32) under which no prediction on `data` changes; text vocabularies are
stored as their terms, one per line. The file is a zip of JSON and safetensors: no pickle (see
lowbit.families.sklearn.lowbit_file and lowbit.families.sklearn.skeleton).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from sklearn.base import BaseEstimator, MetaEstimatorMixin

from lowbit.core.timing import timed
from lowbit.errors import FormatError, LowbitError, QuantizationError
from lowbit.families.sklearn.encodings import LADDERS, sparsity
from lowbit.families.sklearn.estimator_files import measure_files, read_estimator, reference_inputs
from lowbit.families.sklearn.guard import PROBABILITY_TOLERANCE, guard
from lowbit.families.sklearn.lowbit_file import read_file, write_file
from lowbit.families.sklearn.slots import find_slots
from lowbit.families.sklearn.support import check_estimator


class QuantizedEstimator(MetaEstimatorMixin, BaseEstimator):
    """A scikit-learn estimator whose float arrays are stored quantized, with the report of what was
    done to it. It behaves as the estimator it wraps: `predict`, `predict_proba`,
    `decision_function`, `transform` and `score` reach it, as do its fitted attributes.

    `lowbit.sklearn.quantize` returns one already fitted (`estimator` is the quantized copy).
    As a scikit-learn estimator it also clones and refits: `fit(X, y)` fits a clone of
    `estimator` and quantizes it, guarded on `data` (or on `X` when `data` is None), so it works
    in a `Pipeline` or a `GridSearchCV`.
    """

    def __init__(self, estimator: Any = None, bits: int = 8, weight_threshold: float = 0.0,
                 probability_tolerance: float = PROBABILITY_TOLERANCE, data: Any = None) -> None:
        self.estimator = estimator
        self.bits = bits
        self.weight_threshold = weight_threshold
        self.probability_tolerance = probability_tolerance
        self.data = data

    def fit(self, X: Any, y: Any = None, **fit_params: Any) -> QuantizedEstimator:  # noqa: N803 - scikit-learn's name
        """Fit a clone of `estimator` on (X, y), then quantize it with no prediction on the
        reference data (`data`, else X) changed."""
        from sklearn.base import clone

        fitted = clone(self.estimator).fit(X, y, **fit_params)
        reference = self.data if self.data is not None else X
        _quantize_into(self, fitted, reference)
        return self

    def __sklearn_is_fitted__(self) -> bool:
        return "estimator_" in self.__dict__

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("estimator_", "estimator"):
            raise AttributeError(name)
        fitted = self.__dict__.get("estimator_", self.__dict__.get("estimator"))
        if fitted is None:
            raise AttributeError(name)
        return getattr(fitted, name)

    def __getitem__(self, key: Any) -> Any:  # a Pipeline's steps: q[-1].coef_
        return self.estimator_[key]

    def report(self) -> dict[str, Any]:
        return {"bits": self.bits, "verified": self.verified,
                "prediction_differences": self.prediction_differences,
                "max_probability_difference": self.max_probability_difference,
                "held_out": self.held_out, "fallbacks": self.fallbacks, "kept_float": self.kept_float,
                "encodings": {path: encoded.encoding for path, encoded in self.encodings.items()},
                "pruned": {path: share for path, encoded in self.encodings.items()
                           if (share := sparsity(encoded)) is not None}}

    def save(self, path: str | Path, overwrite: bool = False, smaller_than: int | None = None) -> Path:
        """One zip file (see lowbit.families.sklearn.lowbit_file), written atomically; with
        `smaller_than` (bytes) only if it is smaller, else NotSmallerError and nothing written."""
        return write_file(self.estimator_, self.encodings, path, self.report(), overwrite, smaller_than)


NO_DATA = ("no reference data: pass data= (CLI: --data FILE), a sample of the inputs the model will "
           "see (its validation or training data will do). Without it lowbit cannot check that the "
           "smaller arrays leave every prediction unchanged (a GaussianNB whose variances round to "
           "zero predicts NaN), so it writes nothing")


def _quantize_into(target: QuantizedEstimator, estimator: Any, data: Any) -> None:
    """Quantize a fitted `estimator` as `target`'s parameters say, guarded on `data`; the result
    and its report become `target`'s fitted state (`estimator_`, `encodings`, `verified`, ...)."""
    bits, threshold, tolerance = target.bits, target.weight_threshold, target.probability_tolerance
    if bits not in LADDERS:
        raise QuantizationError(f"bits must be one of {', '.join(map(str, LADDERS))}, not {bits}")
    if not threshold >= 0:
        raise QuantizationError(f"weight_threshold must be 0 or more, not {threshold}")
    if not 0 <= tolerance <= 1:
        raise QuantizationError(f"probability_tolerance must be within [0, 1], not {tolerance}")
    kept_float = check_estimator(estimator)
    if data is None:
        raise QuantizationError(NO_DATA)
    data = reference_inputs(data, estimator)
    quantized = copy.deepcopy(estimator)
    slots = [slot for slot in find_slots(quantized) if not any(slot.path.startswith(k) for k in kept_float)]
    try:
        result = guard(slots, bits, quantized, data, tolerance, threshold)
    except LowbitError:
        raise
    except (ValueError, TypeError) as error:
        raise QuantizationError(f"the estimator failed on the reference data: {error}") from None
    target.estimator_ = quantized
    target.encodings, target.verified = result.encodings, result.verified
    target.prediction_differences = result.prediction_differences
    target.max_probability_difference = result.max_probability_difference
    target.held_out = result.held_out
    target.fallbacks, target.kept_float = result.fallbacks, kept_float


def quantize(
    estimator: Any, bits: int = 8, weight_threshold: float = 0.0, data: Any = None,
    probability_tolerance: float = PROBABILITY_TOLERANCE,
) -> QuantizedEstimator:
    """A quantized copy of a fitted estimator or pipeline; the input is not changed.

    `bits` (8, 16 or 32) is where every float array starts. With reference `data` (texts, an
    array, or a .jsonl/.txt/.csv/.npy file) the fidelity guard moves any array that changes a
    prediction to the next wider type (8 → 16 → 32 bits → original), so the result predicts
    `data` exactly as the original does and its probabilities stay within
    `probability_tolerance`. Without `data` it refuses (QuantizationError): nothing could be
    checked. Arrays whose entries are all positive (variances, scales) never take a rung that
    rounds an entry to zero.
    `weight_threshold` > 0 first tries coefficient arrays (coef_, coefs_, dual_coef_,
    components_) with entries below it in magnitude set to zero and stored sparsely; the guard
    undoes the pruning of any array where it changes a prediction.
    """
    quantized = QuantizedEstimator(None, bits, weight_threshold, probability_tolerance)
    _quantize_into(quantized, estimator, data)
    quantized.estimator = quantized.estimator_  # the quantized copy: what clone refits and re-quantizes
    return quantized


def quantize_model_file(
    input_path: str | Path, output_path: str | Path | None = None, bit_depth: int = 8,
    weight_threshold: float = 0.0, data: Any = None, trust_pickle: bool = False, overwrite: bool = False,
    probability_tolerance: float = PROBABILITY_TOLERANCE,
) -> dict[str, Any]:
    """Quantize a saved model file into a lowbit file and measure both.

    `data` (a .jsonl/.txt/.csv/.npy file, texts or an array) is the fidelity guard's reference and
    the throughput workload. Returns sizes, reduction, prediction differences (the reloaded lowbit
    file against the original), load times, predictions per second and the arrays that fell back.
    A pickle or joblib file needs `trust_pickle=True`; a skops file loads safely without it. A
    lowbit file that would be no smaller than the input is not written (NotSmallerError).
    """
    input_path = Path(input_path)
    output_path = Path(output_path) if output_path else input_path.with_suffix(".lowbit")
    if output_path.exists() and not overwrite:
        raise FormatError(f"{output_path} already exists; choose another path or pass overwrite=True")
    estimator = read_estimator(input_path, trust_pickle)
    inputs = reference_inputs(data, estimator)
    quantized, quantize_seconds = timed(lambda: quantize(estimator, bit_depth, weight_threshold, inputs,
                                                         probability_tolerance))
    quantized.save(output_path, overwrite=overwrite, smaller_than=input_path.stat().st_size)
    return {"output_path": str(output_path), "bits": bit_depth, "verified": quantized.verified,
            "quantize_seconds": quantize_seconds,
            **measure_files(input_path, output_path, estimator, inputs, trust_pickle),
            "held_out": quantized.held_out, "fallbacks": quantized.fallbacks,
            "kept_float": quantized.kept_float,
            "pruned": quantized.report()["pruned"]}


def load(path: str | Path) -> Any:
    """The scikit-learn estimator saved by `QuantizedEstimator.save`, rebuilt without pickle."""
    return read_file(path)


__all__ = ["QuantizedEstimator", "load", "quantize", "quantize_model_file"]
