"""The exact names a lowbit scikit-learn file may use, and the few callables it may call.

skops's trusted-type audit is the model: a file names types, and only types on an explicit list
are ever built. Names are looked up in these tables, never resolved by walking attributes (a
name like `sklearn.linear_model._sgd_fast.np.lib._npyio_impl.os.system` once reached
`os.system` that way). Each listed name imports exactly its own module, and the object found
must be the object listed: its `__module__` and `__qualname__` give back the name.

A class is made with `cls.__new__` and given its state; nothing else is called, except the
callables in `CALLABLES`, each after its arguments are checked.
"""

from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from lowbit.errors import FormatError

ESTIMATORS = frozenset({
    # quantized by lowbit (lowbit.families.sklearn.support.SUPPORTED) and the composites around them
    "sklearn.feature_extraction.text.CountVectorizer",
    "sklearn.feature_extraction.text.TfidfVectorizer",
    "sklearn.feature_extraction.text.TfidfTransformer",
    "sklearn.feature_extraction.text.HashingVectorizer",
    "sklearn.preprocessing._data.StandardScaler",
    "sklearn.preprocessing._data.MinMaxScaler",
    "sklearn.decomposition._pca.PCA",
    "sklearn.decomposition._truncated_svd.TruncatedSVD",
    "sklearn.linear_model._logistic.LogisticRegression",
    "sklearn.linear_model._stochastic_gradient.SGDClassifier",
    "sklearn.linear_model._ridge.RidgeClassifier",
    "sklearn.linear_model._base.LinearRegression",
    "sklearn.linear_model._ridge.Ridge",
    "sklearn.svm._classes.LinearSVC",
    "sklearn.svm._classes.SVC",
    "sklearn.naive_bayes.MultinomialNB",
    "sklearn.naive_bayes.ComplementNB",
    "sklearn.naive_bayes.BernoulliNB",
    "sklearn.naive_bayes.GaussianNB",
    "sklearn.neural_network._multilayer_perceptron.MLPClassifier",
    "sklearn.neural_network._multilayer_perceptron.MLPRegressor",
    "sklearn.tree._classes.DecisionTreeClassifier",
    "sklearn.tree._classes.DecisionTreeRegressor",
    "sklearn.tree._classes.ExtraTreeClassifier",
    "sklearn.tree._classes.ExtraTreeRegressor",
    "sklearn.ensemble._forest.RandomForestClassifier",
    "sklearn.ensemble._forest.RandomForestRegressor",
    "sklearn.ensemble._forest.ExtraTreesClassifier",
    "sklearn.ensemble._forest.ExtraTreesRegressor",
    "sklearn.ensemble._gb.GradientBoostingClassifier",
    "sklearn.ensemble._gb.GradientBoostingRegressor",
    "sklearn.ensemble._hist_gradient_boosting.gradient_boosting.HistGradientBoostingClassifier",
    "sklearn.ensemble._hist_gradient_boosting.gradient_boosting.HistGradientBoostingRegressor",
    "sklearn.neighbors._classification.KNeighborsClassifier",
    "sklearn.pipeline.Pipeline",
    "sklearn.pipeline.FeatureUnion",
    "sklearn.compose._column_transformer.ColumnTransformer",
    # common steps kept as they are inside a quantized pipeline
    "sklearn.feature_extraction._dict_vectorizer.DictVectorizer",
    "sklearn.preprocessing._data.MaxAbsScaler",
    "sklearn.preprocessing._data.RobustScaler",
    "sklearn.preprocessing._data.Normalizer",
    "sklearn.preprocessing._data.Binarizer",
    "sklearn.preprocessing._data.PowerTransformer",
    "sklearn.preprocessing._data.QuantileTransformer",
    "sklearn.preprocessing._encoders.OneHotEncoder",
    "sklearn.preprocessing._encoders.OrdinalEncoder",
    "sklearn.preprocessing._label.LabelEncoder",
    "sklearn.preprocessing._label.LabelBinarizer",
    "sklearn.preprocessing._polynomial.PolynomialFeatures",
    "sklearn.preprocessing._discretization.KBinsDiscretizer",
    "sklearn.preprocessing._function_transformer.FunctionTransformer",
    "sklearn.impute._base.SimpleImputer",
    "sklearn.impute._base.MissingIndicator",
    "sklearn.feature_selection._variance_threshold.VarianceThreshold",
    "sklearn.dummy.DummyClassifier",
    "sklearn.dummy.DummyRegressor",
})

HELPERS = frozenset({
    # the fitted state of the estimators above
    "sklearn.tree._tree.Tree",
    "sklearn.ensemble._hist_gradient_boosting.binning._BinMapper",
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
    "sklearn.neural_network._stochastic_optimizers.AdamOptimizer",
    "sklearn.neural_network._stochastic_optimizers.SGDOptimizer",
    "sklearn.neighbors._kd_tree.KDTree",
    "sklearn.neighbors._ball_tree.BallTree",
    *(f"sklearn._loss.loss.{name}" for name in (
        "HalfSquaredError", "AbsoluteError", "PinballLoss", "HuberLoss", "HalfPoissonLoss",
        "HalfGammaLoss", "HalfTweedieLoss", "HalfTweedieLossIdentity", "HalfBinomialLoss",
        "HalfMultinomialLoss", "ExponentialLoss")),
    *(f"sklearn._loss.link.{name}" for name in (
        "Interval", "IdentityLink", "LogLink", "LogitLink", "HalfLogitLink", "MultinomialLogit")),
    "sklearn._loss._loss.CyHalfMultinomialLoss",
    *(f"sklearn.metrics._dist_metrics.{name}{bits}" for bits in (32, 64) for name in (
        "EuclideanDistance", "ManhattanDistance", "ChebyshevDistance", "MinkowskiDistance")),
    "scipy.sparse._csr.csr_matrix",
    "scipy.sparse._csc.csc_matrix",
    "scipy.sparse._csr.csr_array",
    "scipy.sparse._csc.csc_array",
    "numpy.random.mtrand.RandomState",
    "numpy.random._generator.Generator",
    "numpy.random.bit_generator.SeedSequence",
})

BIT_GENERATORS = frozenset({
    "numpy.random._mt19937.MT19937", "numpy.random._pcg64.PCG64", "numpy.random._pcg64.PCG64DXSM",
    "numpy.random._philox.Philox", "numpy.random._sfc64.SFC64",
})

NUMPY_SCALAR_TYPES = frozenset({
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16",
    "float32", "float64", "complex64", "complex128", "str_", "bytes_",
})

BUILTIN_TYPES = {"float": float, "int": int, "str": str, "bool": bool, "bytes": bytes, "complex": complex,
                 "object": object, "slice": slice, "list": list, "dict": dict, "tuple": tuple,
                 "set": set, "frozenset": frozenset}

CLASSES = ESTIMATORS | HELPERS | BIT_GENERATORS

MAX_TREE_OUTPUTS = 1 << 16
MAX_COUNT = 1 << 31


def qualified_name(value: Any) -> str:
    """The name a file uses for a class, function or ufunc: `module.qualname`."""
    if isinstance(value, np.ufunc):
        return f"numpy.{value.__name__}"
    module = getattr(value, "__module__", None) or "builtins"
    return f"{module}.{getattr(value, '__qualname__', getattr(value, '__name__', '?'))}"


def _import_exactly(name: str) -> Any:
    """The object `name` lists: its module imported by its own name, one attribute looked up,
    and the object found must name itself `name`."""
    module_name, _, attribute = name.rpartition(".")
    try:
        value = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError):
        raise FormatError(f"{name} does not exist in this environment (scikit-learn, numpy or "
                          "scipy is a different version)") from None
    if qualified_name(value) != name:
        raise FormatError(f"{name} is not the object this lowbit lists")
    return value


def _numpy_name(name: str) -> Any | None:
    """`numpy.float64`-style scalar types and `numpy.log`-style ufuncs: one attribute of numpy."""
    attribute = name.removeprefix("numpy.")
    if "." in attribute or attribute == name:
        return None
    value = getattr(np, attribute, None)
    if attribute in NUMPY_SCALAR_TYPES and isinstance(value, type) and issubclass(value, np.generic):
        return value
    if isinstance(value, np.ufunc) and value.__name__ == attribute:
        return value
    return None


@functools.lru_cache(maxsize=512)
def resolve_type(name: str) -> Any:
    """A class or ufunc a file names, from the tables above; anything else is a FormatError."""
    if not isinstance(name, str):
        raise FormatError(f"a type name must be text, not {type(name).__name__}")
    if name.startswith("builtins.") and name.removeprefix("builtins.") in BUILTIN_TYPES:
        return BUILTIN_TYPES[name.removeprefix("builtins.")]
    numpy_value = _numpy_name(name)
    if numpy_value is not None:
        return numpy_value
    if name not in CLASSES:
        raise FormatError(f"the file names {name}, which is not on lowbit's list of scikit-learn, "
                          "numpy and scipy types it loads")
    value = _import_exactly(name)
    if not isinstance(value, type):
        raise FormatError(f"{name} is not a class")
    return value


def is_trusted_type(value: Any) -> bool:
    """Whether `value` (a class or ufunc) is one a file may name: the writer's check."""
    try:
        return resolve_type(qualified_name(value)) is value
    except FormatError:
        return False


# ---- the callables a file may ask for, each with its argument check ----

def _is_int(value: Any, low: int = 0, high: int = MAX_COUNT) -> bool:
    return type(value) is int and low <= value <= high


def _is_number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def _check_slice(args: tuple) -> None:
    if not 1 <= len(args) <= 3 or not all(arg is None or type(arg) is int for arg in args):
        raise FormatError("slice takes one to three integers")


def _check_bit_generator_class(args: tuple) -> None:
    if len(args) != 1 or qualified_name(args[0]) not in BIT_GENERATORS or not isinstance(args[0], type):
        raise FormatError("a numpy bit generator is rebuilt from one of numpy's bit generator classes")


def _check_bit_generator_instance(args: tuple) -> None:
    if len(args) != 1 or qualified_name(type(args[0])) not in BIT_GENERATORS:
        raise FormatError("a numpy random generator is rebuilt from a numpy bit generator")


def _check_cython_unpickle(class_name: str) -> Callable[[tuple], None]:
    def check(args: tuple) -> None:
        if (len(args) != 3 or args[0] is not resolve_type(class_name) or type(args[1]) is not int
                or not (args[2] is None or isinstance(args[2], tuple))):
            raise FormatError(f"{class_name} is rebuilt from its own class, a checksum and a state")
    return check


def _check_tree(args: tuple) -> None:
    """Tree(n_features, n_classes, n_outputs): sizes are checked before the tree allocates."""
    if len(args) != 3 or not _is_int(args[0], 1) or not _is_int(args[2], 1, MAX_TREE_OUTPUTS):
        raise FormatError("a tree needs a feature count and an output count in range")
    n_classes = args[1]
    if (not isinstance(n_classes, np.ndarray) or n_classes.dtype != np.intp or n_classes.shape != (args[2],)
            or n_classes.size == 0 or n_classes.min() < 1 or n_classes.max() > MAX_COUNT):
        raise FormatError("a tree's class counts must be one positive integer per output")


def _check_numbers(args: tuple) -> None:
    if len(args) > 2 or not all(_is_number(arg) for arg in args):
        raise FormatError("a loss takes at most two finite numbers")


def _check_new_object(module: str) -> Callable[[tuple], None]:
    def check(args: tuple) -> None:
        if len(args) != 1 or not isinstance(args[0], type) or not qualified_name(args[0]).startswith(module) \
                or qualified_name(args[0]) not in CLASSES:
            raise FormatError(f"{module}newObj makes only the listed classes of its own module")
    return check


CALLABLES: dict[str, Callable[[tuple], None]] = {
    "builtins.slice": _check_slice,
    "numpy.random._pickle.__bit_generator_ctor": _check_bit_generator_class,
    "numpy.random._pickle.__generator_ctor": _check_bit_generator_instance,
    "numpy.random._pickle.__randomstate_ctor": _check_bit_generator_instance,
    "numpy.random.bit_generator.__pyx_unpickle_SeedSequence":
        _check_cython_unpickle("numpy.random.bit_generator.SeedSequence"),
    "sklearn.tree._tree.Tree": _check_tree,
    "sklearn._loss._loss.__pyx_unpickle_CyHalfMultinomialLoss":
        _check_cython_unpickle("sklearn._loss._loss.CyHalfMultinomialLoss"),
    **{f"sklearn._loss._loss.{name}": _check_numbers for name in (
        "CyHalfSquaredError", "CyAbsoluteError", "CyPinballLoss", "CyHuberLoss", "CyHalfPoissonLoss",
        "CyHalfGammaLoss", "CyHalfTweedieLoss", "CyHalfTweedieLossIdentity", "CyHalfBinomialLoss",
        "CyExponentialLoss")},
    **{f"sklearn.linear_model._sgd_fast.{name}": _check_numbers for name in (
        "Hinge", "SquaredHinge", "ModifiedHuber", "EpsilonInsensitive", "SquaredEpsilonInsensitive")},
    **{f"{module}.newObj": _check_new_object(f"{module}.") for module in (
        "sklearn.metrics._dist_metrics", "sklearn.neighbors._kd_tree", "sklearn.neighbors._ball_tree")},
}


def may_call(name: str) -> bool:
    return isinstance(name, str) and name in CALLABLES


@functools.lru_cache(maxsize=64)
def _callable(name: str) -> Callable:
    if name == "builtins.slice":
        return slice
    return _import_exactly(name)


def call(name: str, args: tuple) -> Any:
    """Call one of the listed callables after checking its arguments."""
    if not may_call(name):
        raise FormatError(f"lowbit does not call {name} to rebuild a model")
    CALLABLES[name](args)
    try:
        return _callable(name)(*args)
    except Exception as error:  # noqa: BLE001 - e.g. a Cython unpickler's PickleError: all are the file's fault
        raise FormatError(f"{name} refused its stored arguments: {type(error).__name__}: {error}") from None
