"""A fitted estimator's object graph as JSON, its arrays kept apart: pickle's job, without pickle.

`dump` walks the estimator the way pickle would (`__reduce_ex__`) and writes plain JSON nodes.
Every numpy array becomes a reference into one pool per dtype (saved as safetensors): a
structured array one column per field, an integer array in the narrowest type that holds it
exactly, an array named in `encodings` as its quantized parts. A `str -> 0..n-1` dict (a text
vectorizer's vocabulary) becomes one line of text per term.

`load` rebuilds it and calls nothing a file could choose freely: names are looked up in
lowbit.families.sklearn.trusted's exact lists (never resolved by walking attributes); objects are made
with `cls.__new__` and their state; the few constructors that take arguments (sklearn's Cython
trees and losses, numpy's random generators, `slice`) are named one by one and their arguments
checked. Before compiled code can index with a state, lowbit.families.sklearn.checks bounds it.
"""

from __future__ import annotations

import functools
import json
import math
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lowbit.errors import FormatError
from lowbit.families.sklearn import checks, tables, trusted
from lowbit.families.sklearn.encodings import Encoded, check_encoded, decode, memory_order
from lowbit.families.sklearn.nodes import (
    PLAIN_TYPES,
    plain_dtype,
    set_state,
    shape_of,
    smallest_integer,
    typed_field,
)

MIN_VOCABULARY = 16  # smaller str -> index dicts stay JSON


@dataclass
class _Writer:
    encodings: dict[str, Encoded]
    pools: dict[str, list[np.ndarray]] = field(default_factory=dict)
    pool_sizes: dict[str, int] = field(default_factory=dict)
    record_dtypes: dict[str, int] = field(default_factory=dict)
    texts: list[str] = field(default_factory=list)
    memo: dict[int, int] = field(default_factory=dict)
    alive: list[Any] = field(default_factory=list)  # keeps reduce temporaries alive: ids stay unique

    def array_ref(self, array: np.ndarray) -> list[Any]:
        """[pool, offset, shape]: arrays of one dtype share one stored pool, so a forest's
        thousand node columns load as a few tensors and compress side by side."""
        array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        pool = array.dtype.name
        start = self.pool_sizes.get(pool, 0)
        self.pools.setdefault(pool, []).append(array.ravel())
        self.pool_sizes[pool] = start + array.size
        return [pool, start, list(array.shape)]

    def record_dtype(self, dtype: np.dtype) -> int:
        return self.record_dtypes.setdefault(json.dumps(_dtype_json(dtype)), len(self.record_dtypes))

    def value(self, value: Any, path: str, attributes: bool = False) -> Any:
        """The JSON node of `value`, found at `path`; a dict of `attributes` names its items
        `path.key` (an object's state), like lowbit.families.sklearn.slots does."""
        if type(value) in PLAIN_TYPES:
            return value
        if type(value) is float:
            return value if math.isfinite(value) else {"$": "float", "value": repr(value)}
        if id(value) in self.memo:
            return {"$": "ref", "id": self.memo[id(value)]}
        self.alive.append(value)
        self.memo[id(value)] = node_id = len(self.memo)
        node = self.mapping(value, path, attributes) if type(value) is dict else self.node(value, path)
        node["id"] = node_id
        return node

    def node(self, value: Any, path: str) -> dict[str, Any]:
        if isinstance(value, np.ndarray):
            return self.array(value, path)
        if isinstance(value, np.generic):
            return self.scalar(value)
        if isinstance(value, np.dtype):
            return {"$": "dtype", "dtype": _dtype_json(value)}
        if type(value) is list and (table := tables.dump_items(self, value, path)) is not None:
            return table
        if type(value) in (list, tuple, set, frozenset):
            kind = type(value).__name__
            items = value if kind in ("list", "tuple") else sorted(value, key=repr)
            return {"$": kind, "items": [self.value(item, f"{path}[{i}]") for i, item in enumerate(items)]}
        if isinstance(value, bytes):
            return {"$": "bytes", "hex": value.hex()}
        if isinstance(value, (type, np.ufunc)):
            return self.name(value, path)
        if isinstance(value, (types.FunctionType, types.BuiltinFunctionType, functools.partial)):
            raise FormatError(f"{path} is the function {trusted.qualified_name(value)}; functions cannot "
                              "be stored without pickle (only classes and numpy ufuncs)")
        return self.reduced(value, path)

    def name(self, value: Any, path: str) -> dict[str, Any]:
        name = trusted.qualified_name(value)
        if not trusted.is_trusted_type(value):
            raise FormatError(f"{path} is {name}, which is not on lowbit's list of scikit-learn, numpy and "
                              "scipy types it loads (lowbit.families.sklearn.trusted); it cannot be stored")
        return {"$": "name", "name": name}

    def scalar(self, value: np.generic) -> dict[str, Any]:
        if value.dtype.kind not in "biuf":
            raise FormatError(f"a numpy scalar of dtype {value.dtype} cannot be stored")
        item = value.item()
        if isinstance(item, float) and not math.isfinite(item):
            item = repr(item)
        return {"$": "scalar", "dtype": value.dtype.str, "value": item}

    def mapping(self, value: dict, path: str, attributes: bool) -> dict[str, Any]:
        if _is_vocabulary(value):
            return self.vocabulary(value)
        items = []
        for key, item in value.items():
            item_path = f"{path}.{key}" if attributes and isinstance(key, str) else f"{path}[{key!r}]"
            items.append([self.value(key, f"{item_path}:key"), self.value(item, item_path)])
        return {"$": "dict", "items": items}

    def vocabulary(self, value: dict) -> dict[str, Any]:
        """A fitted vectorizer numbers its terms alphabetically: then the terms are stored in the
        dict's own order (the order of first sight in training, which keeps frequent terms close
        together in memory: lookups measured 2-3% faster than in alphabetical order) and the
        index is each term's rank. Otherwise the terms are stored in index order."""
        by_index = sorted(value, key=value.get)
        alphabetical = by_index == sorted(value)
        self.texts.append("\n".join(value if alphabetical else by_index))
        kind = type(next(iter(value.values())))
        return {"$": "vocabulary", "text": len(self.texts) - 1,
                "index": "rank" if alphabetical else "position",
                "index_type": "int" if kind is int else np.dtype(kind).str}

    def array(self, array: np.ndarray, path: str) -> dict[str, Any]:
        if path in self.encodings:
            encoded = self.encodings[path]
            return {"$": "encoded", "path": path, "encoding": encoded.encoding, "dtype": encoded.dtype,
                    "shape": list(encoded.shape), "order": encoded.order,
                    "parts": {name: self.array_ref(part) for name, part in encoded.parts.items()}}
        if array.dtype.fields is not None:
            return {"$": "record", "dtype": self.record_dtype(array.dtype), "shape": list(array.shape),
                    "fields": {name: self.array(np.ascontiguousarray(array[name]), f"{path}.{name}")
                               for name in array.dtype.names}}  # fresh columns: never shared, no id
        if array.dtype.kind in "US":
            return {"$": "strings", "dtype": array.dtype.str, "shape": list(array.shape),
                    "values": array.ravel().tolist() if array.dtype.kind == "U"
                    else [item.hex() for item in array.ravel().tolist()]}
        if array.dtype.kind == "O":
            items = array.ravel().tolist()
            if (table := tables.dump_items(self, items, path)) is not None:
                return {"$": "objects", "shape": list(array.shape), "table": table}
            return {"$": "objects", "shape": list(array.shape),
                    "values": [self.value(item, f"{path}[{i}]") for i, item in enumerate(items)]}
        if array.dtype.kind not in "biuf":
            raise FormatError(f"{path}: arrays of dtype {array.dtype} cannot be stored")
        stored = smallest_integer(array) if array.dtype.kind in "iu" else array
        node = {"$": "array", "dtype": array.dtype.str, "ref": self.array_ref(stored)}
        if memory_order(array) == "F":
            node["order"] = "F"
        return node

    def reduced(self, value: Any, path: str) -> dict[str, Any]:
        try:
            reduced = value.__reduce_ex__(4)
        except TypeError as error:
            raise FormatError(f"{path}: {type(value).__name__} cannot be stored without pickle "
                              f"({error})") from None
        if isinstance(reduced, str):
            return self.name(value, path)
        self.alive.append(reduced)
        function, args, state, list_items, dict_items = (tuple(reduced) + (None,) * 4)[:5]
        if len(reduced) > 5 and reduced[5] is not None:
            raise FormatError(f"{path}: {type(value).__name__} has its own state setter; not supported")
        node = self.constructor(value, function, args, path)
        node["state"] = None if state is None else self.value(state, path, attributes=True)
        if list_items is not None:
            node["list_items"] = [self.value(item, f"{path}[{i}]") for i, item in enumerate(list_items)]
        if dict_items is not None:
            node["dict_items"] = self.mapping(dict(dict_items), path, attributes=False)
        return node

    def constructor(self, value: Any, function: Any, args: tuple, path: str) -> dict[str, Any]:
        if getattr(function, "__name__", "") == "__newobj__":
            cls = self.name(args[0], path)
            if len(args) > 1:
                raise FormatError(f"{path}: {type(value).__name__} needs constructor arguments; "
                                  "not supported")
            if cls["name"] not in trusted.CLASSES:
                raise FormatError(f"{path}: lowbit does not make objects of {cls['name']}")
            return {"$": "object", "class": cls["name"]}
        name = trusted.qualified_name(function)
        if not trusted.may_call(name):
            raise FormatError(f"{path}: {type(value).__name__} is rebuilt by {name}, "
                              "which lowbit does not call")
        return {"$": "call", "function": name, "args": [self.value(arg, f"{path}.args[{i}]")
                                                         for i, arg in enumerate(args)]}


def _is_vocabulary(value: dict) -> bool:
    if len(value) < MIN_VOCABULARY or not all(isinstance(key, str) and "\n" not in key for key in value):
        return False
    indices = list(value.values())
    kinds = {type(index) for index in indices}
    if len(kinds) != 1 or not issubclass(kinds.pop(), (int, np.integer)) or isinstance(indices[0], bool):
        return False
    return sorted(int(index) for index in indices) == list(range(len(indices)))


def _dtype_json(dtype: np.dtype) -> Any:
    if dtype.fields is None:
        return dtype.str
    return {"names": list(dtype.names),
            "formats": [_dtype_json(dtype.fields[name][0]) for name in dtype.names],
            "offsets": [dtype.fields[name][1] for name in dtype.names], "itemsize": dtype.itemsize}


def _record_dtype_from_json(value: Any) -> np.dtype:
    """A structured dtype, accepted only when it is exactly one scikit-learn defines (a tree's
    nodes): field offsets chosen by a file would let compiled code read across records."""
    if not isinstance(value, dict) or set(value) != {"names", "formats", "offsets", "itemsize"}:
        raise FormatError("a record dtype must give names, formats, offsets and itemsize")
    try:
        formats = [plain_dtype(item) for item in value["formats"]]
        dtype = np.dtype({"names": value["names"], "formats": formats, "offsets": value["offsets"],
                          "itemsize": value["itemsize"]})
    except (TypeError, ValueError) as error:
        raise FormatError(f"a record dtype is malformed: {error}") from None
    if dtype not in checks.record_dtypes():
        raise FormatError(f"the record dtype {dtype} is not one scikit-learn uses")
    return dtype


def dump(estimator: Any, encodings: dict[str, Encoded], path: str = "model"
         ) -> tuple[dict[str, Any], dict[str, np.ndarray], list[str]]:
    """(JSON document, array pools by dtype, texts) for `estimator`; arrays named in
    `encodings` (by lowbit.families.sklearn.slots paths) are stored as those encodings."""
    writer = _Writer(encodings)
    graph = writer.value(estimator, path)
    for dtype_text in writer.record_dtypes:
        _record_dtype_from_json(json.loads(dtype_text))  # what the reader would refuse is not written
    pools = {name: np.concatenate(parts) for name, parts in writer.pools.items()}
    document = {"record_dtypes": [json.loads(text) for text in writer.record_dtypes], "graph": graph}
    return document, pools, writer.texts


@dataclass
class _Reader:
    pools: dict[str, np.ndarray]
    texts: list[str]
    record_dtypes: list[np.dtype]
    memo: dict[int, Any] = field(default_factory=dict)
    built: list[Any] = field(default_factory=list)  # every object made, for the checks after the walk

    def take(self, ref: Any) -> np.ndarray:
        """The stored array at [pool, offset, shape] (a read-only view)."""
        if type(ref) is not list or len(ref) != 3 or type(ref[1]) is not int:
            raise FormatError(f"{str(ref)[:80]} is not a reference into the stored arrays")
        pool = self.pools.get(ref[0]) if type(ref[0]) is str else None
        if pool is None:
            raise FormatError(f"{str(ref)[:80]} is not a reference into the stored arrays")
        start, shape = ref[1], shape_of(ref[2])
        size = shape[0] if len(shape) == 1 else math.prod(shape)
        if start < 0 or start + size > pool.size:
            raise FormatError(f"an array reaches past the end of its pool {ref[0]!r}")
        view = pool[start:start + size]
        return view if len(shape) == 1 else view.reshape(shape)

    def value(self, node: Any) -> Any:
        if not isinstance(node, dict):
            if isinstance(node, list):
                raise FormatError("a list in the graph must be a {'$': 'list'} node")
            return node
        kind = node.get("$")
        if kind == "ref":
            identifier = node.get("id")
            if type(identifier) is not int or identifier not in self.memo:
                raise FormatError(f"a reference to node {identifier!r}, which comes later or not at all")
            return self.memo[identifier]
        build = BUILDERS.get(kind) if isinstance(kind, str) else None
        if build is None:
            raise FormatError(f"unknown node kind {kind!r}")
        value = build(self, node)
        if "id" in node:
            self.remember(node, value)
        return value

    def remember(self, node: dict[str, Any], value: Any) -> None:
        identifier = node["id"]
        if type(identifier) is not int:
            raise FormatError(f"node id {identifier!r} is not an integer")
        self.memo.setdefault(identifier, value)

    def items(self, node: dict[str, Any]) -> list[Any]:
        return [self.value(item) for item in typed_field(node, "items", list)]

    def build_float(self, node: dict[str, Any]) -> float:
        return float(typed_field(node, "value", str))

    def build_dict(self, node: dict[str, Any]) -> dict:
        result: dict = {}
        if "id" in node:
            self.remember(node, result)
        for pair in typed_field(node, "items", list):
            if not isinstance(pair, list) or len(pair) != 2:
                raise FormatError("a dict item must be a [key, value] pair")
            result[self.value(pair[0])] = self.value(pair[1])
        return result

    def build_bytes(self, node: dict[str, Any]) -> bytes:
        return bytes.fromhex(typed_field(node, "hex", str))

    def build_vocabulary(self, node: dict[str, Any]) -> dict:
        index = typed_field(node, "text", int)
        if not 0 <= index < len(self.texts):
            raise FormatError(f"vocabulary text {index} is not in the file")
        terms = self.texts[index].split("\n") if self.texts[index] else []
        kind = typed_field(node, "index_type", str)
        index_type = int if kind == "int" else plain_dtype(kind).type
        if node.get("index") == "position":
            return {term: index_type(position) for position, term in enumerate(terms)}
        if node.get("index") != "rank":
            raise FormatError("a vocabulary's index must be 'position' or 'rank'")
        rank = {term: index_type(position) for position, term in enumerate(sorted(terms))}
        return {term: rank[term] for term in terms}

    def build_scalar(self, node: dict[str, Any]) -> np.generic:
        dtype = plain_dtype(node.get("dtype"))
        value = node.get("value")
        if dtype.kind not in "biuf" or type(value) not in (int, float, str, bool):
            raise FormatError(f"a numpy scalar of dtype {dtype} cannot be read")
        return dtype.type(value)

    def build_dtype(self, node: dict[str, Any]) -> np.dtype:
        value = node.get("dtype")
        return plain_dtype(value) if isinstance(value, str) else _record_dtype_from_json(value)

    def build_array(self, node: dict[str, Any]) -> np.ndarray:
        array = np.array(self.take(node.get("ref")), dtype=plain_dtype(node.get("dtype")))
        return np.asfortranarray(array) if node.get("order") == "F" else array

    def build_encoded(self, node: dict[str, Any]) -> np.ndarray:
        parts = {name: self.take(ref) for name, ref in typed_field(node, "parts", dict).items()}
        encoded = Encoded(typed_field(node, "encoding", str), parts, plain_dtype(node.get("dtype")).str,
                          shape_of(node.get("shape")), typed_field(node, "order", str))
        check_encoded(encoded)
        return decode(encoded)

    def build_record(self, node: dict[str, Any]) -> np.ndarray:
        index = typed_field(node, "dtype", int)
        if not 0 <= index < len(self.record_dtypes):
            raise FormatError(f"record dtype {index} is not in the file")
        dtype, shape = self.record_dtypes[index], shape_of(node.get("shape"))
        columns = typed_field(node, "fields", dict)
        if list(columns) != list(dtype.names):
            raise FormatError("a record array must store each field of its dtype once, in order")
        values = {name: self.build_encoded(column) if column.get("$") == "encoded" else
                  np.asarray(self.take(column.get("ref"))) for name, column in columns.items()}
        if any(column.shape != shape for column in values.values()):
            raise FormatError("a record field's length differs from the record array's")
        array = np.zeros(shape, dtype=dtype)
        for name, column in values.items():
            array[name] = column
        return array

    def build_strings(self, node: dict[str, Any]) -> np.ndarray:
        dtype, shape = plain_dtype(node.get("dtype")), shape_of(node.get("shape"))
        values = typed_field(node, "values", list)
        texts = all(isinstance(value, str) for value in values)
        if dtype.kind not in "US" or len(values) != math.prod(shape) or not texts:
            raise FormatError("a string array must hold one text per element")
        items = values if dtype.kind == "U" else [bytes.fromhex(item) for item in values]
        return np.array(items, dtype=dtype).reshape(shape)

    def build_objects(self, node: dict[str, Any]) -> np.ndarray:
        shape = shape_of(node.get("shape"))
        if "table" in node:
            values = tables.load_items(self, typed_field(node, "table", dict))
        else:
            values = [self.value(item) for item in typed_field(node, "values", list)]
        if len(values) != math.prod(shape):
            raise FormatError("an object array must hold one value per element")
        array = np.empty(len(values), dtype=object)
        array[:] = values
        return array.reshape(shape)

    def build_name(self, node: dict[str, Any]) -> Any:
        return trusted.resolve_type(node.get("name"))

    def build_object(self, node: dict[str, Any]) -> Any:
        name = node.get("class")
        if name not in trusted.CLASSES:
            raise FormatError(f"lowbit does not make objects of {name!r}")
        cls = trusted.resolve_type(name)
        instance = cls.__new__(cls)
        self.remember(node, instance)
        return self.fill(instance, node)

    def build_call(self, node: dict[str, Any]) -> Any:
        name = node.get("function")
        if not trusted.may_call(name):
            raise FormatError(f"lowbit does not call {name!r} to rebuild a model")
        instance = trusted.call(name, tuple(self.items({"$": "call", "items": node.get("args")})))
        self.remember(node, instance)
        return self.fill(instance, node)

    def fill(self, instance: Any, node: dict[str, Any]) -> Any:
        """State, then list and dict items, as pickle applies them; the state is checked first
        where compiled code will index with it (lowbit.families.sklearn.checks)."""
        state = self.value(node.get("state"))
        checks.check_state(instance, state)
        set_state(instance, state)
        for item in self.items({"$": "list_items", "items": node.get("list_items", [])}):
            instance.append(item)
        dict_items = self.value(node.get("dict_items", {"$": "dict", "items": []}))
        if not isinstance(dict_items, dict):
            raise FormatError("an object's dict items must be a dict")
        for key, item in dict_items.items():
            instance[key] = item
        self.built.append(instance)
        return instance


BUILDERS: dict[str, Callable[[_Reader, dict[str, Any]], Any]] = {
    "float": _Reader.build_float,
    "list": lambda reader, node: reader.items(node),
    "table": tables.load_items,
    "tuple": lambda reader, node: tuple(reader.items(node)),
    "set": lambda reader, node: set(reader.items(node)),
    "frozenset": lambda reader, node: frozenset(reader.items(node)),
    "dict": _Reader.build_dict,
    "bytes": _Reader.build_bytes,
    "vocabulary": _Reader.build_vocabulary,
    "scalar": _Reader.build_scalar,
    "dtype": _Reader.build_dtype,
    "array": _Reader.build_array,
    "encoded": _Reader.build_encoded,
    "record": _Reader.build_record,
    "strings": _Reader.build_strings,
    "objects": _Reader.build_objects,
    "name": _Reader.build_name,
    "object": _Reader.build_object,
    "call": _Reader.build_call,
}


def load(document: Any, pools: dict[str, np.ndarray], texts: list[str]) -> Any:
    """The estimator `dump` described, after its structure is checked (lowbit.families.sklearn.checks).

    Every malformed document ends in a FormatError, never in another exception; a document
    nested past Python's recursion limit ends in one too (a RecursionError, caught below).
    """
    if not isinstance(document, dict) or not isinstance(document.get("record_dtypes"), list):
        raise FormatError("skeleton.json is not a lowbit object graph")
    try:
        record_dtypes = [_record_dtype_from_json(value) for value in document["record_dtypes"]]
        reader = _Reader(pools, texts, record_dtypes)
        estimator = reader.value(document.get("graph"))
        checks.check_built(reader.built)
    except FormatError:
        raise
    except Exception as error:  # noqa: BLE001 - only vetted code runs here: whatever it raises, the file is at fault
        raise FormatError(f"the model cannot be rebuilt: {type(error).__name__}: {error}") from None
    return estimator
