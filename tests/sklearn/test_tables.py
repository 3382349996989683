"""Tables (lowbit.families.sklearn.tables): many objects of one class stored as columns load as
exactly the objects the generic graph gives, and anything a table cannot hold falls back to it."""

import json
import zipfile

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer, load_digits, load_iris
from sklearn.ensemble import (
    ExtraTreesRegressor,
    GradientBoostingClassifier,
    HistGradientBoostingClassifier,
    RandomForestClassifier,
)
from sklearn.neural_network import MLPClassifier, MLPRegressor

import lowbit.sklearn as lowbit_sklearn
from lowbit.families.sklearn import lowbit_file, probe, skeleton, tables


def _model(name):
    digits, digit_labels = load_digits(return_X_y=True)
    cancer, cancer_labels = load_breast_cancer(return_X_y=True)
    iris, iris_labels = load_iris(return_X_y=True)
    return {
        "forest": (RandomForestClassifier(12, max_depth=8, random_state=0).fit(digits, digit_labels), digits),
        "extra-trees-regressor": (ExtraTreesRegressor(10, max_depth=6, random_state=0).fit(
            cancer, cancer_labels * 1.5), cancer),
        "hist-boosting": (HistGradientBoostingClassifier(max_iter=12, random_state=0).fit(
            cancer, cancer_labels), cancer),
        "multiclass-hist-boosting": (HistGradientBoostingClassifier(max_iter=8, random_state=0).fit(
            iris, iris_labels), iris),  # lists of three predictors: one table with groups
        "boosting": (GradientBoostingClassifier(n_estimators=4, random_state=0).fit(iris, iris_labels), iris),
        "mlp": (MLPClassifier((8,), max_iter=40, random_state=0).fit(iris, iris_labels), iris),
    }[name]


def _leaves(value, path="model", seen=None):
    """Every array, scalar and plain value reachable from `value`, by path (what must be equal).
    `seen` holds each object visited (not its id: a state dict is a temporary whose id recurs)."""
    seen = {} if seen is None else seen
    if isinstance(value, np.ndarray) and value.dtype == object:
        value = value.ravel().tolist()
    if isinstance(value, (np.ndarray, np.generic, str, int, float, bool, type(None))):
        yield path, value
        return
    if id(value) in seen:
        return
    seen[id(value)] = value
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(item, f"{path}[{key!r}]", seen)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _leaves(item, f"{path}[{index}]", seen)
    elif hasattr(value, "__getstate__"):
        yield from _leaves(value.__getstate__(), f"{path}.state", seen)


def _generic_file(quantized, path, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(tables, "MIN_ITEMS", 10**9)
        return quantized.save(path)


def _has_table(path):
    with zipfile.ZipFile(path) as archive:
        return '"$": "table"' in archive.read("skeleton.json").decode().replace('"$":"table"', '"$": "table"')


@pytest.mark.parametrize("name", ["forest", "extra-trees-regressor", "hist-boosting",
                                  "multiclass-hist-boosting", "boosting", "mlp"])
def test_a_table_loads_exactly_what_the_generic_graph_loads(name, tmp_path, monkeypatch):
    model, rows = _model(name)
    quantized = lowbit_sklearn.quantize(model, bits=8, data=rows[:60])
    with_tables = quantized.save(tmp_path / "tables.lowbit")
    generic = _generic_file(quantized, tmp_path / "generic.lowbit", monkeypatch)
    assert _has_table(with_tables) and not _has_table(generic)
    from_tables, from_generic = lowbit_sklearn.load(with_tables), lowbit_sklearn.load(generic)
    left, right = dict(_leaves(from_tables)), dict(_leaves(from_generic))
    assert left.keys() == right.keys()
    for path, value in left.items():
        other = right[path]
        assert type(value) is type(other), path
        if isinstance(value, np.ndarray):
            assert value.dtype == other.dtype and value.shape == other.shape, path
            assert value.tobytes() == other.tobytes(), path  # bit for bit, NaNs and signed zeros too
        else:
            assert repr(value) == repr(other), path
    assert np.array_equal(from_tables.predict(rows), quantized.predict(rows))
    assert with_tables.stat().st_size <= generic.stat().st_size * 1.02


def test_a_forest_is_a_few_nodes_not_thousands(tmp_path):
    model, rows = _model("forest")
    path = lowbit_sklearn.quantize(model, bits=8, data=rows[:60]).save(tmp_path / "f.lowbit")
    with zipfile.ZipFile(path) as archive:
        document = json.loads(archive.read("skeleton.json"))
        manifest = json.loads(archive.read("lowbit.json"))
    assert manifest["version"] == lowbit_file.VERSION == 3
    assert len(json.dumps(document)) < 12_000  # the generic graph: ~2,200 characters per tree


def _round_trip(estimator):
    """(JSON document, rebuilt estimator) through the object graph alone, nothing quantized."""
    document, pools, texts = skeleton.dump(estimator, {})
    return document, skeleton.load(json.loads(json.dumps(document)), pools, texts)


def test_an_object_every_tree_shares_is_stored_once_and_stays_shared():
    model, rows = _model("forest")
    for tree in model.estimators_:
        tree.classes_ = model.estimators_[0].classes_
    document, reloaded = _round_trip(model)
    assert '"table"' in json.dumps(document)
    assert all(tree.classes_ is reloaded.estimators_[0].classes_ for tree in reloaded.estimators_)
    assert np.array_equal(reloaded.predict(rows), model.predict(rows))


def test_a_tree_listed_twice_stays_in_the_generic_graph():
    model, rows = _model("forest")
    model.estimators_[1] = model.estimators_[0]
    document, reloaded = _round_trip(model)
    assert '"table"' not in json.dumps(document)
    assert reloaded.estimators_[1] is reloaded.estimators_[0]
    assert np.array_equal(reloaded.predict(rows), model.predict(rows))


def test_a_shared_object_that_holds_an_item_undoes_the_table():
    """The random state every tree shares holds the first tree: the table is undone and the
    generic graph keeps both identities."""
    model, rows = _model("forest")
    holder = np.empty(1, dtype=object)
    holder[0] = model.estimators_[0]
    for tree in model.estimators_:
        tree.holder = holder
    document, reloaded = _round_trip(model)
    assert '"table"' not in json.dumps(document)
    assert reloaded.estimators_[3].holder[0] is reloaded.estimators_[0]


def test_a_list_of_numpy_scalars_is_one_column(tmp_path):
    model, rows = _model("mlp")
    assert len(model.loss_curve_) >= tables.MIN_ITEMS
    model.best_loss_ = model.loss_curve_[3]  # a later reference into the table's items
    path = lowbit_sklearn.quantize(model, bits=8, data=rows).save(tmp_path / "m.lowbit")
    reloaded = lowbit_sklearn.load(path)
    assert reloaded.best_loss_ is reloaded.loss_curve_[3]
    assert [repr(value) for value in reloaded.loss_curve_] == [repr(value) for value in model.loss_curve_]


@pytest.mark.parametrize("name", ["forest", "extra-trees-regressor", "mlp"])
def test_the_fast_probes_compute_what_predict_computes(name):
    model, rows = _model(name)
    assert type(model).__module__ + "." + type(model).__qualname__ in probe.PREDICTS
    assert np.array_equal(probe._predict(model, "predict", rows), model.predict(rows))


def test_the_fast_probes_cover_two_output_forests_and_network_regressors():
    cancer, labels = load_breast_cancer(return_X_y=True)
    targets = np.stack([labels * 1.5, cancer[:, 0]], axis=1)
    forest = ExtraTreesRegressor(6, max_depth=5, random_state=0).fit(cancer, targets)
    network = MLPRegressor(hidden_layer_sizes=(6,), max_iter=30, random_state=0).fit(cancer / 100, targets)
    for model, rows in ((forest, cancer), (network, cancer / 100)):
        assert np.array_equal(probe._predict(model, "predict", rows), model.predict(rows))


def test_inspect_lists_the_encodings_inside_tables(tmp_path):
    model, rows = _model("forest")
    path = lowbit_sklearn.quantize(model, bits=8, data=rows[:60]).save(tmp_path / "f.lowbit")
    arrays = lowbit_file.describe_file(path)["arrays"]
    prefix = "model.estimators_[*].tree_.nodes.threshold"
    thresholds = [entry for entry in arrays if entry["path"].startswith(prefix)]
    assert thresholds and all(entry["encoding"] == "int16-rows" for entry in thresholds)
    nodes = sum(tree.tree_.node_count for tree in model.estimators_)
    assert sum(entry["shape"][0] for entry in thresholds) == nodes
