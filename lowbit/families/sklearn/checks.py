"""Bounds on the state that scikit-learn's compiled code indexes with, checked as a file loads.

scikit-learn trusts a pickle's trees: a child or feature index past its table, a cycle of
children, or a record dtype with moved fields makes `predict` read out of bounds (a crash) or
loop forever. A lowbit file is not trusted, so every such index is bounded here before any
compiled code sees it:

- `check_state(instance, state)` runs before an object takes its state (trees, histogram-boosting
  predictors, k-d and ball trees, distance metrics);
- `check_built(objects)` runs once the whole graph is built, for checks that need two objects
  (an estimator's feature count against its trees), and for scipy sparse matrices.

Children must come after their parent in a node table (scikit-learn builds them in that order),
which rules out cycles and bounds every walk by the table's length.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np

from lowbit.errors import FormatError
from lowbit.families.sklearn.trusted import HELPERS, qualified_name

BITSET_WORDS = 8  # scikit-learn's categorical bitsets: 8 × 32 bits for categories 0..255


@functools.lru_cache(maxsize=1)
def record_dtypes() -> tuple[np.dtype, ...]:
    """The structured dtypes scikit-learn's compiled code reads: tree nodes, histogram-boosting
    predictor nodes, k-d and ball tree node data."""
    from sklearn.ensemble._hist_gradient_boosting.common import PREDICTOR_RECORD_DTYPE
    from sklearn.neighbors._kd_tree import NodeData
    from sklearn.tree._tree import NODE_DTYPE

    return NODE_DTYPE, PREDICTOR_RECORD_DTYPE, np.dtype(NodeData)


def _fail(what: str) -> None:
    raise FormatError(f"the file's {what}")


def _array(value: Any, what: str, dtype: Any = None, ndim: int | None = None) -> np.ndarray:
    if not isinstance(value, np.ndarray) or (dtype is not None and value.dtype != np.dtype(dtype)) \
            or (ndim is not None and value.ndim != ndim):
        _fail(f"{what} is not a {ndim}-d array of {np.dtype(dtype) if dtype is not None else 'numbers'}")
    return value


def _children_after_parents(left: np.ndarray, right: np.ndarray, internal: np.ndarray,
                            counts: np.ndarray, what: str) -> None:
    """Every internal node's children lie after it and inside its own table: no cycles, no reads
    past the end. The tables of many trees are checked at once, laid end to end (`counts` are
    their lengths)."""
    sizes = np.repeat(counts, counts)
    local = np.arange(sizes.size) - np.repeat(np.cumsum(counts) - counts, counts)
    for children in (left, right):
        child = children[internal].astype(np.int64)
        if np.any(child <= local[internal]) or np.any(child >= sizes[internal]):
            _fail(f"{what} has a child index before its parent or past the end of its table")


def _check_tree(tree: Any, state: Any) -> None:
    """sklearn.tree._tree.Tree before it takes its state: node table and values, sized right
    (the indices inside are checked for all trees at once by `_check_trees`)."""
    from sklearn.tree._tree import NODE_DTYPE

    if not isinstance(state, dict) or not {"node_count", "nodes", "values"} <= set(state):
        _fail("tree state lacks its nodes")
    nodes = _array(state["nodes"], "tree nodes", NODE_DTYPE, 1)
    count = state["node_count"]
    if type(count) is not int or count != nodes.size or count < 1:
        _fail("tree node count differs from its node table")
    values = _array(state["values"], "tree values", np.float64, 3)
    if values.shape != (count, tree.n_outputs, tree.max_n_classes):
        _fail("tree values do not have one row per node")
    if type(state.get("max_depth", 0)) is not int or not 0 <= state.get("max_depth", 0) <= count:
        _fail("tree depth is out of range")


def _check_trees(trees: list[Any]) -> None:
    """Children and split features of every tree, bounded before any tree is walked."""
    if not trees:
        return
    counts = np.array([tree.node_count for tree in trees])
    left = np.concatenate([tree.children_left for tree in trees])
    right = np.concatenate([tree.children_right for tree in trees])
    leaf = left == -1
    if np.any(leaf != (right == -1)):
        _fail("tree has a node with one child")
    _children_after_parents(left, right, ~leaf, counts, "tree")
    features = np.concatenate([tree.feature for tree in trees])[~leaf]
    limits = np.repeat([tree.n_features for tree in trees], counts)[~leaf]
    if np.any(features < 0) or np.any(features >= limits):
        _fail("tree splits on a feature past its feature count")


def _check_predictor(_: Any, state: Any) -> None:
    """A histogram-boosting TreePredictor before it takes its state: node table and categorical
    bitsets of the right types (indices: `_check_predictors`)."""
    from sklearn.ensemble._hist_gradient_boosting.common import PREDICTOR_RECORD_DTYPE

    needed = {"nodes", "raw_left_cat_bitsets", "binned_left_cat_bitsets"}
    if not isinstance(state, dict) or not needed <= set(state):
        _fail("predictor state lacks its nodes or bitsets")
    if _array(state["nodes"], "predictor nodes", PREDICTOR_RECORD_DTYPE, 1).size < 1:
        _fail("predictor has no nodes")
    for name in ("raw_left_cat_bitsets", "binned_left_cat_bitsets"):
        bitsets = _array(state[name], f"predictor {name}", np.uint32, 2)
        if bitsets.shape[1] != BITSET_WORDS:
            _fail(f"predictor {name} are not {BITSET_WORDS} words each")


def _fields(tables: list[np.ndarray], names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The named fields of many record arrays, each laid end to end (concatenating the records
    themselves is ten times slower: numpy promotes their structured dtypes field by field)."""
    return {name: np.concatenate([table[name] for table in tables]) for name in names}


def _check_predictors(predictors: list[Any]) -> None:
    """Children and categorical bitset indices of every predictor, bounded at once."""
    if not predictors:
        return
    counts = np.array([predictor.nodes.size for predictor in predictors])
    nodes = _fields([predictor.nodes for predictor in predictors],
                    ("is_leaf", "left", "right", "is_categorical", "bitset_idx", "feature_idx"))
    leaf = nodes["is_leaf"] != 0
    _children_after_parents(nodes["left"], nodes["right"], ~leaf, counts, "predictor")
    bitsets = np.repeat([predictor.raw_left_cat_bitsets.shape[0] for predictor in predictors], counts)
    categorical = (nodes["is_categorical"] != 0) & ~leaf
    if np.any(nodes["bitset_idx"][categorical] >= bitsets[categorical]):
        _fail("predictor names a categorical bitset past the end of its table")
    if np.any(nodes["feature_idx"][~leaf] < 0):
        _fail("predictor splits on a negative feature")


def _check_binary_tree(tree: Any, state: Any) -> None:
    """sklearn.neighbors KDTree / BallTree: data, index permutation, node data and bounds."""
    if not isinstance(state, tuple) or len(state) != 13:
        _fail("neighbours tree state is not the 13 fields scikit-learn stores")
    data = _array(state[0], "neighbours tree data", np.float64, 2)
    samples, features = data.shape
    index = _array(state[1], "neighbours tree index", np.intp, 1)
    if index.size != samples or not np.array_equal(np.sort(index), np.arange(samples)):
        _fail("neighbours tree index is not a permutation of its samples")
    node_data = _array(state[2], "neighbours tree nodes", record_dtypes()[2], 1)
    nodes = node_data.size
    bounds = _array(state[3], "neighbours tree bounds", np.float64, 3)
    if bounds.shape[1:] != (nodes, features) or bounds.shape[0] not in (1, 2):
        _fail("neighbours tree bounds do not have one row per node and feature")
    if not all(type(value) is int and 0 <= value < 1 << 40 for value in state[4:11]) or state[6] != nodes:
        _fail("neighbours tree counters are out of range")
    start, end = node_data["idx_start"], node_data["idx_end"]
    if nodes < 1 or np.any(start < 0) or np.any(start > end) or np.any(end > samples):
        _fail("neighbours tree node ranges reach past its samples")
    internal = np.flatnonzero(node_data["is_leaf"] == 0)
    if np.any(2 * internal + 2 >= nodes) or np.any((node_data["is_leaf"] != 0) & (node_data["is_leaf"] != 1)):
        _fail("neighbours tree has an internal node without children")
    if qualified_metric(state[11]) is None:
        _fail("neighbours tree metric is not one lowbit loads")
    if state[12] is not None and _array(state[12], "sample weights", np.float64, 1).size != samples:
        _fail("neighbours tree sample weights do not match its samples")


def qualified_metric(metric: Any) -> str | None:
    name = qualified_name(type(metric))
    return name if name.startswith("sklearn.metrics._dist_metrics.") and name in HELPERS else None


def _check_metric(_: Any, state: Any) -> None:
    """A distance metric: p, and weight vectors of matching lengths."""
    if not isinstance(state, tuple) or len(state) != 3 or type(state[0]) is not float:
        _fail("distance metric state is not (p, vector, matrix)")
    _array(state[1], "distance metric vector", np.float64, 1)
    _array(state[2], "distance metric matrix", np.float64, 2)
    if not state[0] >= 1:
        _fail("distance metric p is below 1")


STATE_CHECKS: dict[str, Callable[[Any, Any], None]] = {
    "sklearn.tree._tree.Tree": _check_tree,
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor": _check_predictor,
    "sklearn.neighbors._kd_tree.KDTree": _check_binary_tree,
    "sklearn.neighbors._ball_tree.BallTree": _check_binary_tree,
    **{f"sklearn.metrics._dist_metrics.{name}{bits}": _check_metric for bits in (32, 64) for name in (
        "EuclideanDistance", "ManhattanDistance", "ChebyshevDistance", "MinkowskiDistance")},
}


def check_state(instance: Any, state: Any) -> None:
    """Raise FormatError when `state` would let compiled code index out of bounds."""
    check = STATE_CHECKS.get(qualified_name(type(instance)))
    if check is not None:
        check(instance, state)


# ---- checks that need the whole graph ----

def _feature_count(estimator: Any) -> int | None:
    count = getattr(estimator, "n_features_in_", None)
    return count if type(count) is int else None


def _check_tree_estimator(estimator: Any) -> None:
    tree, count = getattr(estimator, "tree_", None), _feature_count(estimator)
    if tree is None:  # a forest's unfitted template estimator
        return
    if count is not None and tree.n_features != count:
        _fail("tree's feature count differs from its estimator's")
    if getattr(estimator, "n_outputs_", tree.n_outputs) != tree.n_outputs:
        _fail("tree's output count differs from its estimator's")


def _check_histogram_boosting(estimator: Any) -> None:
    count = _feature_count(estimator)
    mapper = getattr(estimator, "_bin_mapper", None)
    if count is None or mapper is None:
        _fail("histogram boosting model lacks its feature count or bin mapper")
    categorical = getattr(mapper, "is_categorical_", None)
    categorical = np.zeros(count, bool) if categorical is None else categorical
    if not isinstance(categorical, np.ndarray) or categorical.shape != (count,):
        _fail("histogram boosting model's categorical flags do not match its features")
    thresholds = getattr(mapper, "bin_thresholds_", [])
    if not isinstance(thresholds, list) or len(thresholds) != count:
        _fail("histogram boosting model's bin thresholds do not match its features")
    for feature in np.flatnonzero(categorical):
        known = _array(thresholds[feature], "known categories", None, 1)
        if known.size and (known.min() < 0 or known.max() >= BITSET_WORDS * 32):
            _fail("histogram boosting model has a category outside 0..255")
    predictors = [predictor for group in getattr(estimator, "_predictors", []) for predictor in group]
    if not predictors:
        return
    nodes = _fields([predictor.nodes for predictor in predictors],
                    ("is_leaf", "is_categorical", "feature_idx"))
    split = nodes["is_leaf"] == 0
    if np.any(nodes["feature_idx"][split] >= count):
        _fail("histogram boosting tree splits on a feature past its feature count")
    on_category = (nodes["is_categorical"] != 0) & split
    if np.any(categorical[nodes["feature_idx"][on_category]] == 0):
        _fail("histogram boosting tree splits by category on a numeric feature")


def _check_neighbours(estimator: Any) -> None:
    tree = getattr(estimator, "_tree", None)
    fitted = getattr(estimator, "_fit_X", None)
    count = _feature_count(estimator)
    if tree is not None and (count is None or tree.data.shape[1] != count):
        _fail("neighbours tree's feature count differs from its estimator's")
    wrong_width = count is not None and fitted is not None and fitted.shape[-1] != count
    if isinstance(fitted, np.ndarray) and (fitted.ndim != 2 or wrong_width):
        _fail("neighbours data's feature count differs from its estimator's")


def _check_svc(svc: Any) -> None:
    """libsvm reads support vectors, coefficients and intercepts by counts it trusts: each must
    match the others, or `predict` reads past an array."""
    if getattr(svc, "kernel", None) not in ("linear", "poly", "rbf", "sigmoid"):
        _fail("SVC kernel is not one lowbit loads (linear, poly, rbf, sigmoid)")
    counts = _array(getattr(svc, "_n_support", None), "SVC support counts", np.int32, 1)
    classes, vectors = counts.size, getattr(svc, "support_vectors_", None)
    total = vectors.shape[0] if hasattr(vectors, "shape") and len(vectors.shape) == 2 else -1
    if classes < 2 or np.any(counts < 0) or int(counts.sum()) != total:
        _fail("SVC support counts do not add up to its support vectors")
    support = _array(getattr(svc, "support_", None), "SVC support", np.int32, 1)
    if vectors.shape[1] != _feature_count(svc) or support.size != total:
        _fail("SVC support vectors do not match its feature count")
    pairs = classes * (classes - 1) // 2
    shapes = {"_dual_coef_": (classes - 1, total), "_intercept_": (pairs,), "classes_": (classes,)}
    for name, shape in shapes.items():
        value = getattr(svc, name, None)
        if not hasattr(value, "shape") or tuple(value.shape) != shape:
            _fail(f"SVC {name} does not have shape {shape}")
    for name in ("_probA", "_probB"):
        if _array(getattr(svc, name, None), f"SVC {name}", np.float64, 1).size not in (0, pairs):
            _fail(f"SVC {name} does not have one value per class pair")


def _check_vocabulary(vectorizer: Any) -> None:
    """Term indices are the matrix's columns: exactly 0..n-1, and the idf weights one per term."""
    vocabulary = getattr(vectorizer, "vocabulary_", None)
    if vocabulary is None:
        return
    kinds = {type(index) for index in vocabulary.values()} if isinstance(vocabulary, dict) else {str}
    if not kinds <= {int, np.int64}:
        _fail("vectorizer's vocabulary is not a map of terms to integer columns")
    indices = np.fromiter(vocabulary.values(), dtype=np.int64, count=len(vocabulary))
    if indices.size and (indices.min() < 0 or indices.max() >= indices.size
                         or np.any(np.bincount(indices) != 1)):
        _fail("vectorizer's vocabulary indices are not 0..n-1")
    idf = getattr(getattr(vectorizer, "_tfidf", None), "idf_", None)
    if idf is not None and np.shape(idf) != (indices.size,):
        _fail("vectorizer's idf weights are not one per term")


def _check_sparse(matrix: Any) -> None:
    try:
        matrix.check_format(full_check=True)
    except (ValueError, TypeError, AttributeError, IndexError) as error:
        _fail(f"sparse matrix is malformed: {error}")


TREE_ESTIMATORS = frozenset(f"sklearn.tree._classes.{name}" for name in (
    "DecisionTreeClassifier", "DecisionTreeRegressor", "ExtraTreeClassifier", "ExtraTreeRegressor"))

BUILT_CHECKS: dict[str, Callable[[Any], None]] = {
    **dict.fromkeys(TREE_ESTIMATORS, _check_tree_estimator),
    **{f"sklearn.ensemble._hist_gradient_boosting.gradient_boosting.{name}": _check_histogram_boosting
       for name in ("HistGradientBoostingClassifier", "HistGradientBoostingRegressor")},
    "sklearn.neighbors._classification.KNeighborsClassifier": _check_neighbours,
    "sklearn.svm._classes.SVC": _check_svc,
    "sklearn.feature_extraction.text.CountVectorizer": _check_vocabulary,
    "sklearn.feature_extraction.text.TfidfVectorizer": _check_vocabulary,
    **{f"scipy.sparse.{name}": _check_sparse for name in (
        "_csr.csr_matrix", "_csc.csc_matrix", "_csr.csr_array", "_csc.csc_array")},
}


@functools.cache
def _parameter_names(cls: type) -> tuple[str, ...]:
    return tuple(cls._get_param_names())


def _validate_parameters(estimator: Any) -> None:
    """What `estimator._validate_params()` does, with the class's parameter names read from its
    signature once instead of at every load (a third of the MLP's check time); classes with
    their own `get_params` or `_validate_params` run theirs."""
    from sklearn.base import BaseEstimator
    from sklearn.utils._param_validation import validate_parameter_constraints

    cls = type(estimator)
    own = (cls.get_params is not BaseEstimator.get_params
           or cls._validate_params is not BaseEstimator._validate_params)
    if own:
        estimator._validate_params()
        return
    parameters = {name: getattr(estimator, name) for name in _parameter_names(cls)}
    validate_parameter_constraints(cls._parameter_constraints, parameters, caller_name=cls.__name__)


def _check_parameters(estimator: Any) -> None:
    """scikit-learn's own check of an estimator's hyper-parameters (types, ranges, choices).
    Single trees are skipped: their predict reads only `tree_` (checked above), and a forest
    holds hundreds of them."""
    checkable = getattr(estimator, "_validate_params", None) is not None \
        and hasattr(type(estimator), "_parameter_constraints")
    if not checkable or qualified_name(type(estimator)) in TREE_ESTIMATORS:
        return
    try:
        _validate_parameters(estimator)
    except (ValueError, TypeError) as error:
        _fail(f"{type(estimator).__name__} has an invalid parameter: {str(error)[:200]}")


def check_built(objects: list[Any]) -> None:
    """Checks across objects, once the whole graph is built and before anything is called."""
    by_class: dict[str, list[Any]] = {}
    for instance in objects:
        by_class.setdefault(qualified_name(type(instance)), []).append(instance)
    _check_trees(by_class.get("sklearn.tree._tree.Tree", []))
    _check_predictors(by_class.get("sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor", []))
    for instance in objects:
        check = BUILT_CHECKS.get(qualified_name(type(instance)))
        if check is not None:
            check(instance)
        _check_parameters(instance)
