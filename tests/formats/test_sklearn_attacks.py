"""Crafted scikit-learn files, each with every checksum recomputed: none may run code, read or
delete a file outside itself, or crash; each is refused with a LowbitError (issue 10)."""

import gc
import json
import pickle
import sys
import zipfile

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.ensemble import RandomForestClassifier

import lowbit
import lowbit.sklearn as lowbit_sklearn
from lowbit.errors import LowbitError
from tests.formats.attacker import (
    REPORT,
    craft_sklearn_file,
    forbidden,
    opened_under,
    rewrite_sklearn_file,
    watching,
)


class Canary:
    """Pickled into a crafted file: unpickling it writes the canary file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').write('pwned')",))


@pytest.fixture
def places(tmp_path):
    """(the attack file's folder, an outside folder with a secret and a victim, the canary path)."""
    inside, outside = tmp_path / "inside", tmp_path / "outside"
    inside.mkdir()
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    (outside / "victim.txt").write_text("do not delete")
    return inside, outside, outside / "canary.txt"


def assert_refused_safely(path, outside, canary):
    with watching() as events, pytest.raises(LowbitError):
        lowbit.load(path)
    gc.collect()
    assert not canary.exists(), "code ran"
    assert opened_under(events, outside) == [], "a file outside the model was opened"
    assert forbidden(events) == [], "a program ran, or a file was deleted or renamed"
    assert (outside / "victim.txt").read_text() == "do not delete"


WALK = "sklearn.linear_model._sgd_fast.np.lib._npyio_impl"


def test_a_name_walked_out_of_sklearn_to_os_system_is_refused(places):
    inside, outside, canary = places
    graph = {"$": "call", "function": f"{WALK}.os.system", "args": [f"touch {canary}"], "state": None}
    assert_refused_safely(craft_sklearn_file(inside / "m.lowbit", graph), outside, canary)


def test_an_embedded_pickle_is_never_unpickled(places):
    inside, outside, canary = places
    payload = pickle.dumps(Canary(str(canary)))
    graph = {"$": "call", "function": f"{WALK}.pickle.loads", "args": [{"$": "bytes", "hex": payload.hex()}],
             "state": None}
    assert_refused_safely(craft_sklearn_file(inside / "m.lowbit", graph), outside, canary)


def test_numpy_load_with_allow_pickle_is_never_called(places):
    inside, outside, canary = places
    npy = outside / "payload.npy"
    np.save(npy, np.array([Canary(str(canary))], dtype=object), allow_pickle=True)
    graph = {"$": "call", "function": "sklearn.linear_model._sgd_fast.np.load",
             "args": [str(npy), None, True], "state": None}
    assert_refused_safely(craft_sklearn_file(inside / "m.lowbit", graph), outside, canary)


def test_numpy_generator_constructor_cannot_start_a_program(places):
    inside, outside, canary = places
    graph = {"$": "call", "function": "numpy.random._pickle.__generator_ctor",
             "args": [{"$": "list", "items": ["touch", str(canary)]},
                      {"$": "name", "name": "numpy.f2py.subprocess.Popen"}], "state": None}
    assert_refused_safely(craft_sklearn_file(inside / "m.lowbit", graph), outside, canary)


def test_numpy_memmap_cannot_read_a_file_outside(places):
    inside, outside, canary = places
    graph = {"$": "call", "function": "sklearn.linear_model._sgd_fast.np.memmap",
             "args": [str(outside / "secret.txt")], "state": None}
    assert_refused_safely(craft_sklearn_file(inside / "m.lowbit", graph), outside, canary)


def test_a_temporary_file_closer_cannot_delete_a_file_when_collected(places):
    inside, outside, canary = places
    graph = {"$": "object", "class": "sklearn.utils._testing.tempfile._TemporaryFileCloser", "id": 0,
             "state": {"$": "dict", "items": [["name", str(outside / "victim.txt")], ["delete", True],
                                              ["file", None], ["close_called", False]]}}
    assert_refused_safely(craft_sklearn_file(inside / "m.lowbit", graph), outside, canary)


def test_a_class_reached_by_walking_attributes_is_refused(places):
    """os._wrap_close is a class, reached from sklearn by attribute walking: only the listed
    names resolve, each to the object that carries that very name."""
    inside, outside, canary = places
    graph = {"$": "name", "name": f"{WALK}.os._wrap_close"}
    assert_refused_safely(craft_sklearn_file(inside / "m.lowbit", graph), outside, canary)


def test_zip_entries_that_name_paths_outside_are_refused(places):
    inside, outside, canary = places
    path = craft_sklearn_file(inside / "m.lowbit", {"$": "list", "items": []},
                              extra={"../outside/secret.txt": b"x"})
    assert_refused_safely(path, outside, canary)


def test_a_zip_bomb_is_refused_before_it_is_inflated(places):
    """An entry that inflates to 200 MB from a few hundred kB, with lowbit.json recording that
    size: refused from the declared sizes, before any of it is read."""
    import resource

    inside, outside, canary = places
    path = inside / "bomb.lowbit"
    size = 200 << 20
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        digest = __import__("hashlib").sha256()
        with archive.open("arrays.safetensors", "w", force_zip64=True) as handle:
            for _ in range(size >> 20):
                handle.write(bytes(1 << 20))
                digest.update(bytes(1 << 20))
        skeleton = json.dumps({"record_dtypes": [], "graph": None}).encode()
        archive.writestr("skeleton.json", skeleton)
        archive.writestr("lowbit.json", json.dumps({
            "format": "lowbit-sklearn", "version": 2, "estimator": "x", "report": REPORT,
            "sha256": {"arrays.safetensors": digest.hexdigest(), "skeleton.json": __import__("hashlib")
                       .sha256(skeleton).hexdigest()},
            "sizes": {"arrays.safetensors": size, "skeleton.json": len(skeleton)}}))
    assert path.stat().st_size < 2 << 20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(LowbitError, match="zip bomb"):
        lowbit.load(path)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB: under 100 MB
    assert not canary.exists()


def _saved_forest(tmp_path_factory, trees):
    """(a quantized digits forest of `trees` trees saved as a lowbit file, rows to call it on)."""
    features, labels = load_digits(return_X_y=True)
    forest = RandomForestClassifier(trees, max_depth=4, random_state=0).fit(features, labels)
    path = tmp_path_factory.mktemp("forest") / "forest.lowbit"
    lowbit_sklearn.quantize(forest, bits=8, data=features[:100]).save(path)
    return path, features[100:140]


@pytest.fixture(scope="module")
def forest_file(tmp_path_factory):
    return _saved_forest(tmp_path_factory, 3)  # fewer trees than a table takes: the generic graph


def _edit_graph(path, edit):
    def change(entries):
        document = json.loads(entries["skeleton.json"])
        edit(document)
        entries["skeleton.json"] = json.dumps(document).encode()
    return rewrite_sklearn_file(path, change)


def _tree_nodes(document):
    """Every Tree's state node (the nodes record) in a forest's graph."""
    found, stack = [], [document["graph"]]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if node.get("$") == "record":
                found.append(node)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return found


def _set_column(path, document, column, value):
    """Point a tree's column at a new int64 array appended to the file's arrays."""
    from safetensors.numpy import load, save

    def change(entries):
        pools = load(entries["arrays.safetensors"])
        record = _tree_nodes(document)[0]
        size = int(np.prod(record["shape"]))
        pool = pools.get("int64", np.zeros(0, np.int64))
        record["fields"][column] = {"$": "array", "dtype": "<i8", "ref": ["int64", pool.size, [size]]}
        pools["int64"] = np.concatenate([pool, value(size)])
        entries["arrays.safetensors"] = save(pools)
        entries["skeleton.json"] = json.dumps(document).encode()
    return rewrite_sklearn_file(path, change)


@pytest.mark.parametrize("column, value", [
    ("left_child", lambda size: np.full(size, 10**9, np.int64)),
    ("feature", lambda size: np.full(size, 10**9, np.int64)),
    ("left_child", lambda size: np.zeros(size, np.int64)),  # every node its own child: a cycle
], ids=["child-index-1e9", "feature-index-1e9", "cyclic-children"])
def test_tree_indices_out_of_bounds_or_cyclic_are_refused_before_predict(forest_file, tmp_path, column,
                                                                         value):
    source, rows = forest_file
    path = tmp_path / "m.lowbit"
    path.write_bytes(source.read_bytes())
    with zipfile.ZipFile(path) as archive:
        document = json.loads(archive.read("skeleton.json"))
    _set_column(path, document, column, value)
    with pytest.raises(LowbitError):
        lowbit.load(path).predict(rows)


def test_zeroed_record_dtype_offsets_are_refused(forest_file, tmp_path):
    source, _ = forest_file
    path = tmp_path / "m.lowbit"
    path.write_bytes(source.read_bytes())
    _edit_graph(path, lambda document: document["record_dtypes"][0].update(
        offsets=[0] * len(document["record_dtypes"][0]["offsets"])))
    with pytest.raises(LowbitError, match="record dtype"):
        lowbit.load(path)


def test_a_tree_claiming_2_to_the_40_outputs_is_refused_before_allocating(places):
    inside, outside, canary = places
    graph = {"$": "call", "function": "sklearn.tree._tree.Tree", "state": None,
             "args": [4, {"$": "array", "dtype": "<i8", "ref": ["int64", 0, [1]]}, 2**40]}
    from safetensors.numpy import save

    path = craft_sklearn_file(inside / "m.lowbit", graph, arrays=save({"int64": np.array([2])}))
    with pytest.raises(LowbitError, match="output count"):
        lowbit.load(path)


def test_a_bit_flip_in_a_vocabulary_is_a_format_error(tmp_path):
    from sklearn.feature_extraction.text import CountVectorizer

    from lowbit.data import assets

    texts = [document["extract"] for document in assets.wikipedia_documents()[:50]]
    path = lowbit_sklearn.quantize(CountVectorizer().fit(texts), data=texts).save(tmp_path / "v.lowbit")

    def flip(entries):
        data = bytearray(entries["vocabulary/0.txt"])
        data[3] = 0xFF
        entries["vocabulary/0.txt"] = bytes(data)
    rewrite_sklearn_file(path, flip)
    with pytest.raises(lowbit.FormatError, match="UTF-8"):
        lowbit.load(path)


def test_a_crafted_file_cannot_recurse_the_loader_to_death(places):
    inside, outside, canary = places
    graph: object = 0
    for _ in range(sys.getrecursionlimit() * 3):
        graph = {"$": "list", "items": [graph]}
    sys.setrecursionlimit(sys.getrecursionlimit() + 20000)
    try:
        path = craft_sklearn_file(inside / "m.lowbit", graph)
    finally:
        sys.setrecursionlimit(sys.getrecursionlimit() - 20000)
    assert_refused_safely(path, outside, canary)


def test_a_cython_unpickler_given_a_wrong_checksum_is_a_format_error(places):
    """Found by the fuzzer (seed 7, case 2158): Cython's unpickle helpers raise PickleError."""
    inside, outside, canary = places
    graph = {"$": "call", "function": "sklearn._loss._loss.__pyx_unpickle_CyHalfMultinomialLoss",
             "state": None, "args": [{"$": "name", "name": "sklearn._loss._loss.CyHalfMultinomialLoss"}, 0,
                      {"$": "tuple", "items": []}]}
    assert_refused_safely(craft_sklearn_file(inside / "m.lowbit", graph), outside, canary)


# ---- tables (lowbit.families.sklearn.tables): a forest of 8+ trees is one table node ----

@pytest.fixture(scope="module")
def table_forest(tmp_path_factory):
    return _saved_forest(tmp_path_factory, 8)


def _table(document):
    return document["graph"]["state"]["items"][[key for key, _ in document["graph"]["state"]["items"]]
                                                .index("estimators_")][1]


def _tree_column(table, key):
    """The `tree_` objects column's state column `key` (nodes, values, node_count, ...)."""
    state = table["items"]["state"]
    tree = state["columns"][state["keys"].index("tree_")]
    return tree["state"]["columns"][tree["state"]["keys"].index(key)]


def _copy(source, tmp_path):
    path = tmp_path / "m.lowbit"
    path.write_bytes(source.read_bytes())
    with zipfile.ZipFile(path) as archive:
        return path, json.loads(archive.read("skeleton.json"))


def _set_table_column(path, document, field, value):
    """Point one field of every tree's node table at new int64 values appended to the arrays."""
    from safetensors.numpy import load, save

    def change(entries):
        pools = load(entries["arrays.safetensors"])
        records = _tree_column(_table(document), "nodes")
        size = sum(_row_counts(pools, records))
        pool = pools.get("int64", np.zeros(0, np.int64))
        records["fields"][field] = [{"items": 8, "encoding": "plain", "data": ["int64", pool.size, [size]]}]
        pools["int64"] = np.concatenate([pool, value(size)])
        entries["arrays.safetensors"] = save(pools)
        entries["skeleton.json"] = json.dumps(document).encode()
    return rewrite_sklearn_file(path, change)


def _row_counts(pools, column):
    """Each item's row count, as a table column stores them."""
    name, start, shape = column["counts"]
    return pools[name][start:start + shape[0]].tolist()


@pytest.mark.parametrize("field, value", [
    ("left_child", lambda size: np.full(size, 10**9, np.int64)),
    ("feature", lambda size: np.full(size, 10**9, np.int64)),
    ("left_child", lambda size: np.zeros(size, np.int64)),
], ids=["child-index-1e9", "feature-index-1e9", "cyclic-children"])
def test_table_tree_indices_out_of_bounds_or_cyclic_are_refused(table_forest, tmp_path, field, value):
    source, rows = table_forest
    path, document = _copy(source, tmp_path)
    assert _table(document)["$"] == "table"
    _set_table_column(path, document, field, value)
    with pytest.raises(LowbitError):
        lowbit.load(path).predict(rows)


@pytest.mark.parametrize("edit, message", [
    (lambda table: table["items"].update({"class": "posix.system"}), "not one lowbit makes"),
    (lambda table: _tree_column(table, "nodes").update({"kind": "pickle"}), "unknown"),
    (lambda table: _tree_column(table, "values")["segments"][0].update({"items": 99}), "cover"),
    (lambda table: _tree_column(table, "values")["segments"][0].update({"encoding": "pickle"}), "unknown"),
    (lambda table: _tree_column(table, "node_count").update(kind="each", values=[1] * 8), "node count"),
    (lambda table: table.update({"count": 2**40}), "out of range"),
], ids=["class-not-listed", "column-kind", "segment-items", "segment-encoding", "node-count", "count"])
def test_a_malformed_table_is_a_format_error(table_forest, tmp_path, edit, message):
    source, _ = table_forest
    path, _ = _copy(source, tmp_path)
    _edit_graph(path, lambda document: edit(_table(document)))
    with watching() as events, pytest.raises(lowbit.FormatError, match=message):
        lowbit.load(path)
    assert forbidden(events) == []


def test_a_table_constructor_must_be_listed(table_forest, tmp_path):
    source, _ = table_forest
    path, _ = _copy(source, tmp_path)

    def edit(document):
        tree = _table(document)["items"]["state"]
        column = tree["columns"][tree["keys"].index("tree_")]
        column["function"] = "builtins.eval"
    _edit_graph(path, edit)
    with pytest.raises(lowbit.FormatError, match="not one lowbit calls"):
        lowbit.load(path)


def test_table_trees_without_their_state_are_refused(table_forest, tmp_path):
    """Found by the fuzzer (seed 3, case 6118, a boosting model): Trees built with no node table
    crashed predict."""
    source, _ = table_forest
    path, _ = _copy(source, tmp_path)

    def edit(document):
        tree = _table(document)["items"]["state"]
        tree["columns"][tree["keys"].index("tree_")]["state"] = None
    _edit_graph(path, edit)
    with pytest.raises(lowbit.FormatError, match="tree state lacks its nodes"):
        lowbit.load(path)


def test_a_forest_missing_what_predict_reads_is_refused_at_load(table_forest, tmp_path):
    """Found by the fuzzer (seed 3, case 6922): the forest probe must read what predict reads."""
    source, rows = table_forest
    path, _ = _copy(source, tmp_path)

    def edit(document):
        items = document["graph"]["state"]["items"]
        items[:] = [item for item in items if item[0] != "n_classes_"]
    _edit_graph(path, edit)
    with pytest.raises(lowbit.FormatError, match="n_classes_"):
        lowbit.load(path)


def test_a_few_byte_table_cannot_ask_for_millions_of_objects(places):
    """A table's item count must be paid for in the file: some column stores one value per item."""
    inside, outside, canary = places
    graph = {"$": "table", "path": "model", "count": 10**6,
             "items": {"kind": "objects", "class": "sklearn.tree._classes.DecisionTreeClassifier",
                       "first_id": 1, "state": {"keys": ["max_depth"], "first_id": 2,
                                                "columns": [{"kind": "same", "value": 3}]}}}
    path = craft_sklearn_file(inside / "m.lowbit", graph)
    with pytest.raises(LowbitError, match="nothing per item"):
        lowbit.load(path)
    assert_refused_safely(path, outside, canary)
