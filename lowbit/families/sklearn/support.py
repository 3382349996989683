"""Which scikit-learn estimators lowbit quantizes, and the checks that come before it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from lowbit.errors import QuantizationError

SUPPORTED = frozenset({
    "CountVectorizer", "TfidfVectorizer", "TfidfTransformer", "HashingVectorizer", "StandardScaler",
    "MinMaxScaler", "PCA", "TruncatedSVD", "LogisticRegression", "LinearSVC", "SGDClassifier",
    "RidgeClassifier", "LinearRegression", "Ridge", "MultinomialNB", "ComplementNB", "BernoulliNB",
    "GaussianNB", "SVC", "MLPClassifier", "MLPRegressor", "DecisionTreeClassifier",
    "DecisionTreeRegressor", "RandomForestClassifier", "RandomForestRegressor", "ExtraTreesClassifier",
    "ExtraTreesRegressor", "GradientBoostingClassifier", "GradientBoostingRegressor",
    "HistGradientBoostingClassifier", "HistGradientBoostingRegressor", "KNeighborsClassifier",
})
COMPOSITES = {"Pipeline": "steps", "ColumnTransformer": "transformers_", "FeatureUnion": "transformer_list"}


def _components(estimator: Any, path: str) -> Iterator[tuple[str, Any]]:
    """(path, estimator) of every leaf of a Pipeline / ColumnTransformer / FeatureUnion tree, with
    paths as lowbit.families.sklearn.slots names them."""
    name = type(estimator).__name__
    if name not in COMPOSITES:
        yield path, estimator
        return
    attribute = COMPOSITES[name]
    for index, item in enumerate(getattr(estimator, attribute, [])):
        child = item[1]
        if isinstance(child, str) or child is None:  # "passthrough", "drop"
            continue
        yield from _components(child, f"{path}.{attribute}[{index}][1]")


def _is_fitted(estimator: Any) -> bool:
    from sklearn.utils.validation import check_is_fitted

    try:
        check_is_fitted(estimator)
    except Exception:  # noqa: BLE001 - NotFittedError, or an estimator check_is_fitted cannot read
        return False
    return True


def check_estimator(estimator: Any) -> list[str]:
    """Raise on what cannot be quantized; return the paths of unsupported components (kept as
    they are, and reported) inside a supported composite."""
    if not type(estimator).__module__.startswith("sklearn"):
        raise QuantizationError(f"expected a fitted scikit-learn estimator or pipeline, got "
                                f"{type(estimator).__module__}.{type(estimator).__name__}")
    leaves = list(_components(estimator, "model"))
    if type(estimator).__name__ not in COMPOSITES and type(estimator).__name__ not in SUPPORTED:
        raise QuantizationError(f"{type(estimator).__name__} is not supported; supported: "
                                f"{', '.join(sorted(SUPPORTED | set(COMPOSITES)))}")
    unfitted = [type(leaf).__name__ for _, leaf in leaves if type(leaf).__name__ in SUPPORTED and
                type(leaf).__name__ != "HashingVectorizer" and not _is_fitted(leaf)]
    if unfitted:
        raise QuantizationError(f"the estimator is not fitted ({', '.join(unfitted)}); fit it first")
    return [path for path, leaf in leaves if type(leaf).__name__ not in SUPPORTED]
