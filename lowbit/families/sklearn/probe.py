"""A loaded estimator proves it works before it is handed over: predictions on a few synthetic
rows, recorded when the file was saved, are made again at load and must match.

The rows are made from the model itself (zeros, ones and a fixed pattern of its input width, or
a few texts for a text pipeline), so no user data goes into the file. A file whose state would
make `predict` fail, or predict differently than when it was saved (a tampered array, another
scikit-learn that reads the state differently), is refused at load with a FormatError instead of
failing or silently misbehaving at the user's first call.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from sklearn.utils.validation import check_is_fitted

from lowbit.errors import FormatError

TEXT_VECTORIZERS = ("CountVectorizer", "TfidfVectorizer", "HashingVectorizer")
PROBE_TEXTS = ["", "the of and in a", "quantization of 8 bits", "Zürich 1999 €"]
MAX_WIDTH = 1 << 20


def first_step(estimator: Any) -> Any:
    while hasattr(estimator, "steps") and estimator.steps:
        estimator = estimator.steps[0][1]
    return estimator


def probe_inputs(estimator: Any) -> Any | None:
    """A few synthetic rows the estimator accepts, or None when it takes named columns (a
    DataFrame) whose types cannot be made up."""
    first = first_step(estimator)
    if type(first).__name__ in TEXT_VECTORIZERS:
        return list(PROBE_TEXTS)
    if getattr(estimator, "feature_names_in_", None) is not None:
        return None
    width = getattr(estimator, "n_features_in_", None)
    if type(width) is not int or not 0 < width <= MAX_WIDTH:
        return None
    pattern = np.where(np.arange(width) % 2 == 0, 0.5, -2.0)
    return np.stack([np.zeros(width), np.ones(width), -np.ones(width), pattern])


def _method(estimator: Any) -> str | None:
    for name in ("predict", "transform"):
        if callable(getattr(estimator, name, None)):
            return name
    return None


def _fingerprint(outputs: Any) -> list[Any]:
    """Predictions as JSON: labels as they are; a transform's rows by their sums and norms."""
    if hasattr(outputs, "toarray"):
        outputs = outputs.toarray()
    outputs = np.asarray(outputs)
    if outputs.ndim == 2:
        values = np.concatenate([outputs.sum(axis=1), np.linalg.norm(outputs, axis=1)])
        return [float(value) for value in values]
    return [value.item() if isinstance(value, np.generic) else value for value in outputs.tolist()]


def record(estimator: Any) -> dict[str, Any]:
    """What the file stores: the probe's method and outputs, or no method when the estimator
    cannot be probed with synthetic rows (it refuses them, or takes named columns)."""
    inputs, method = probe_inputs(estimator), _method(estimator)
    if inputs is None or method is None:
        return {"method": None}
    try:
        outputs = _fingerprint(getattr(estimator, method)(inputs))
    except Exception:  # noqa: BLE001 - e.g. an encoder that refuses unknown categories
        return {"method": None}
    return {"method": method, "outputs": outputs}


def _same(recorded: list[Any], made: list[Any]) -> bool:
    if len(recorded) != len(made):
        return False
    for old, new in zip(recorded, made, strict=True):
        numbers = all(type(v) in (int, float) for v in (old, new))
        both_nan = numbers and math.isnan(old) and math.isnan(new)
        if numbers and not both_nan and not math.isclose(old, new, rel_tol=1e-6, abs_tol=1e-9):
            return False
        if not numbers and old != new:
            return False
    return True


def _forest_mean(forest: Any, rows: np.ndarray, total: Callable[[int], np.ndarray],
                 output: Callable[[Any], Callable]) -> np.ndarray:
    """What a single-output forest's `predict_proba` (or a regressor's `predict`) computes, step
    by step as scikit-learn does (fitted check, input check, a zero array of the width it
    expects, each tree's output added in order, divided by the tree count), without joblib's
    dispatch of every tree: 4 of the 5 ms a 100-tree forest's probe took."""
    check_is_fitted(forest)
    rows = forest._validate_X_predict(rows)
    summed = total(rows.shape[0])
    for tree in forest.estimators_:
        summed += output(tree)(rows, check_input=False)
    summed /= len(forest.estimators_)
    return summed


Predict = Callable[[Any, np.ndarray], np.ndarray]


def _single_output(fast: Predict) -> Predict:
    """`fast` for a single-output forest; a multi-output one runs its own `predict`."""
    def predict(forest: Any, rows: np.ndarray) -> np.ndarray:
        return fast(forest, rows) if getattr(forest, "n_outputs_", None) == 1 else forest.predict(rows)
    return predict


def _forest_classes(forest: Any, rows: np.ndarray) -> np.ndarray:
    [width] = np.atleast_1d(forest.n_classes_)
    mean = _forest_mean(forest, rows, lambda count: np.zeros((count, width), dtype=np.float64),
                        lambda tree: tree.predict_proba)
    return forest.classes_.take(np.argmax(mean, axis=1), axis=0)


def _forest_values(forest: Any, rows: np.ndarray) -> np.ndarray:
    return _forest_mean(forest, rows, lambda count: np.zeros(count, dtype=np.float64),
                        lambda tree: tree.predict)


def _network_outputs(network: Any, rows: np.ndarray) -> np.ndarray:
    """What an MLP's `predict` computes: its fitted check, then scikit-learn's own `_predict`
    without the input check, which was half of the probe's 0.5 ms. The probe rows are float64
    of the model's input width, and a first layer of another width fails the product."""
    check_is_fitted(network)
    return network._predict(rows, check_input=False)


FOREST, NETWORK = "sklearn.ensemble._forest.", "sklearn.neural_network._multilayer_perceptron."
FORESTS = ("RandomForest", "ExtraTrees")
PREDICTS: dict[str, Predict] = {
    **{f"{FOREST}{name}Classifier": _single_output(_forest_classes) for name in FORESTS},
    **{f"{FOREST}{name}Regressor": _single_output(_forest_values) for name in FORESTS},
    **{f"{NETWORK}MLP{kind}": _network_outputs for kind in ("Classifier", "Regressor")},
}


def _predict(estimator: Any, method: str, inputs: Any) -> Any:
    """The probe's outputs; a single-output forest's or a network's through PREDICTS, which
    computes what its `predict` does (tests/sklearn/test_tables.py holds them equal)."""
    fast = PREDICTS.get(f"{type(estimator).__module__}.{type(estimator).__qualname__}")
    if method == "predict" and fast is not None:
        return fast(estimator, inputs)
    return getattr(estimator, method)(inputs)


def check(estimator: Any, recorded: Any) -> None:
    """Predict the probe rows again and compare with what the file recorded."""
    if not isinstance(recorded, dict) or recorded.get("method") is None:
        return
    method, outputs = recorded["method"], recorded.get("outputs")
    if method not in ("predict", "transform") or not isinstance(outputs, list):
        raise FormatError("the file's probe record is malformed")
    try:
        inputs = probe_inputs(estimator)
        if inputs is None:
            raise FormatError("the rebuilt model does not take the probe rows it was saved with")
        made = _fingerprint(_predict(estimator, method, inputs))
    except FormatError:
        raise
    except Exception as error:  # noqa: BLE001 - whatever a broken state raises, it must not escape untyped
        raise FormatError(f"the rebuilt model fails on probe rows ({type(error).__name__}: "
                          f"{str(error)[:200]}); the file is corrupt or was crafted") from None
    if not _same(outputs, made):
        raise FormatError("the rebuilt model does not reproduce the predictions recorded when the file "
                          "was saved; the file was changed, or this scikit-learn reads it differently")
