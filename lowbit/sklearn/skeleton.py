"""A fitted estimator's object graph as JSON, its arrays kept apart: pickle's job, without pickle.

`dump` walks the estimator the way pickle would (`__reduce_ex__`) and writes plain JSON nodes.
Every numpy array becomes a reference into one pool per dtype (saved as safetensors): a
structured array one column per field, an integer array in the narrowest type that holds it
exactly, an array named in `encodings` as its quantized parts. A `str -> 0..n-1` dict (a text
vectorizer's vocabulary) becomes one line of text per term.

`load` rebuilds it and calls nothing a file could choose freely: names resolve only to classes
and ufuncs inside scikit-learn, numpy and scipy (never to other functions); objects are made
with `cls.__new__` and their state; the few constructors that take arguments (sklearn's Cython
trees and losses, numpy's random generators, `slice`) are named one by one.
"""

from __future__ import annotations

import functools
import importlib
import json
import math
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lowbit.errors import FormatError
from lowbit.sklearn.encodings import Encoded, decode, memory_order

TRUSTED_MODULES = ("sklearn.", "numpy.", "scipy.")
BUILTIN_NAMES = frozenset({"float", "int", "str", "bool", "bytes", "complex", "slice", "list", "dict",
                           "tuple", "set", "frozenset", "object"})
CALLABLE_NAMES = frozenset({
    "builtins.slice", "sklearn.tree._tree.Tree", "numpy.random._pickle.__randomstate_ctor",
    "numpy.random._pickle.__generator_ctor", "numpy.random._pickle.__bit_generator_ctor",
})
CALLABLE_PREFIXES = ("sklearn._loss._loss.Cy", "sklearn.linear_model._sgd_fast.")
MIN_VOCABULARY = 16  # smaller str -> index dicts stay JSON
PLAIN_TYPES = (str, bool, int, type(None))  # exact types: numpy's float64 and str_ subclass float and str


def _qualified_name(value: Any) -> str:
    if isinstance(value, np.ufunc):
        return f"numpy.{value.__name__}"
    module = getattr(value, "__module__", None) or "builtins"
    return f"{module}.{getattr(value, '__qualname__', getattr(value, '__name__', '?'))}"


def _is_trusted_name(name: str) -> bool:
    module, _, attribute = name.rpartition(".")
    return name.startswith(TRUSTED_MODULES) or (module == "builtins" and attribute in BUILTIN_NAMES)


def _may_call(name: str) -> bool:
    if name in CALLABLE_NAMES or name.startswith(CALLABLE_PREFIXES):
        return True
    if name.startswith("sklearn.") and name.endswith(".newObj"):  # `cls.__new__(cls)` for Cython classes
        return True
    return name.startswith(TRUSTED_MODULES) and name.rpartition(".")[2].startswith("__pyx_unpickle_")


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
        `path.key` (an object's state), like lowbit.sklearn.slots does."""
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
        if type(value) in (list, tuple, set, frozenset):
            kind = type(value).__name__
            items = value if kind in ("list", "tuple") else sorted(value, key=repr)
            return {"$": kind, "items": [self.value(item, f"{path}[{i}]") for i, item in enumerate(items)]}
        if isinstance(value, bytes):
            return {"$": "bytes", "hex": value.hex()}
        if isinstance(value, (type, np.ufunc)):
            return self.name(value, path)
        if isinstance(value, (types.FunctionType, types.BuiltinFunctionType, functools.partial)):
            raise FormatError(f"{path} is the function {_qualified_name(value)}; functions cannot be stored "
                              "without pickle (only classes and numpy ufuncs)")
        return self.reduced(value, path)

    def name(self, value: Any, path: str) -> dict[str, Any]:
        name = _qualified_name(value)
        if not _is_trusted_name(name) or "<" in name:
            raise FormatError(f"{path} is {name}; only scikit-learn, numpy and scipy functions and classes "
                              "can be stored without pickle")
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
            return {"$": "objects", "shape": list(array.shape),
                    "values": [self.value(item, f"{path}[{i}]") for i, item in enumerate(items)]}
        if array.dtype.kind not in "biuf":
            raise FormatError(f"{path}: arrays of dtype {array.dtype} cannot be stored")
        stored = _smallest_integer(array) if array.dtype.kind in "iu" else array
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
            return {"$": "object", "class": cls["name"]}
        name = _qualified_name(function)
        if not _may_call(name):
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


def _smallest_integer(array: np.ndarray) -> np.ndarray:
    """The same integers in the narrowest type that holds them all (tree child indices and
    features fit int16 where they were int64)."""
    if array.size == 0:
        return array
    low, high = int(array.min()), int(array.max())
    for candidate in (np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32):
        limits = np.iinfo(candidate)
        if limits.min <= low and high <= limits.max and np.dtype(candidate).itemsize < array.dtype.itemsize:
            return array.astype(candidate)
    return array


def _dtype_json(dtype: np.dtype) -> Any:
    if dtype.fields is None:
        return dtype.str
    return {"names": list(dtype.names),
            "formats": [_dtype_json(dtype.fields[name][0]) for name in dtype.names],
            "offsets": [dtype.fields[name][1] for name in dtype.names], "itemsize": dtype.itemsize}


def _dtype_from_json(value: Any) -> np.dtype:
    if isinstance(value, str):
        return _plain_dtype(value)
    formats = [_dtype_from_json(item) for item in value["formats"]]
    return np.dtype({"names": value["names"], "formats": formats, "offsets": value["offsets"],
                     "itemsize": value["itemsize"]})


@functools.lru_cache(maxsize=256)
def _plain_dtype(text: str) -> np.dtype:
    dtype = np.dtype(text)
    if dtype.kind == "O":
        raise FormatError("object dtypes are not stored in lowbit files")
    return dtype


def dump(estimator: Any, encodings: dict[str, Encoded], path: str = "model"
         ) -> tuple[dict[str, Any], dict[str, np.ndarray], list[str]]:
    """(JSON document, array pools by dtype, texts) for `estimator`; arrays named in
    `encodings` (by lowbit.sklearn.slots paths) are stored as those encodings."""
    writer = _Writer(encodings)
    graph = writer.value(estimator, path)
    pools = {name: np.concatenate(parts) for name, parts in writer.pools.items()}
    document = {"record_dtypes": [json.loads(text) for text in writer.record_dtypes], "graph": graph}
    return document, pools, writer.texts


@dataclass
class _Reader:
    pools: dict[str, np.ndarray]
    texts: list[str]
    record_dtypes: list[np.dtype]
    memo: dict[int, Any] = field(default_factory=dict)

    def take(self, ref: list[Any]) -> np.ndarray:
        """The stored array at [pool, offset, shape] (a read-only view)."""
        pool, start, shape = ref
        size = math.prod(shape)
        stored = self.pools[pool][start:start + size]
        if stored.size != size:
            raise FormatError(f"an array reaches past the end of its pool {pool!r}")
        return stored.reshape(shape)

    def value(self, node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        kind = node["$"]
        if kind == "ref":
            return self.memo[node["id"]]
        build: Callable[[dict[str, Any]], Any] | None = getattr(self, f"build_{kind}", None)
        if build is None:
            raise FormatError(f"unknown node kind {kind!r}")
        value = build(node)
        if "id" in node:
            self.memo.setdefault(node["id"], value)
        return value

    def build_float(self, node: dict[str, Any]) -> float:
        return float(node["value"])

    def build_list(self, node: dict[str, Any]) -> list:
        return [self.value(item) for item in node["items"]]

    def build_tuple(self, node: dict[str, Any]) -> tuple:
        return tuple(self.value(item) for item in node["items"])

    def build_set(self, node: dict[str, Any]) -> set:
        return {self.value(item) for item in node["items"]}

    def build_frozenset(self, node: dict[str, Any]) -> frozenset:
        return frozenset(self.value(item) for item in node["items"])

    def build_dict(self, node: dict[str, Any]) -> dict:
        result: dict = {}
        if "id" in node:
            self.memo[node["id"]] = result
        result.update((self.value(key), self.value(item)) for key, item in node["items"])
        return result

    def build_bytes(self, node: dict[str, Any]) -> bytes:
        return bytes.fromhex(node["hex"])

    def build_vocabulary(self, node: dict[str, Any]) -> dict:
        text = self.texts[node["text"]]
        terms = text.split("\n") if text else []
        index_type = int if node["index_type"] == "int" else np.dtype(node["index_type"]).type
        if node["index"] == "position":
            return {term: index_type(index) for index, term in enumerate(terms)}
        rank = {term: index_type(index) for index, term in enumerate(sorted(terms))}
        return {term: rank[term] for term in terms}

    def build_scalar(self, node: dict[str, Any]) -> np.generic:
        dtype = _dtype_from_json(node["dtype"])
        if dtype.kind not in "biuf":
            raise FormatError(f"a numpy scalar of dtype {dtype} cannot be read")
        return dtype.type(node["value"])

    def build_dtype(self, node: dict[str, Any]) -> np.dtype:
        return _dtype_from_json(node["dtype"])

    def build_array(self, node: dict[str, Any]) -> np.ndarray:
        array = np.array(self.take(node["ref"]), dtype=_dtype_from_json(node["dtype"]))
        return np.asfortranarray(array) if node.get("order") == "F" else array

    def build_encoded(self, node: dict[str, Any]) -> np.ndarray:
        parts = {name: self.take(ref) for name, ref in node["parts"].items()}
        return decode(Encoded(node["encoding"], parts, node["dtype"], tuple(node["shape"]), node["order"]))

    def build_record(self, node: dict[str, Any]) -> np.ndarray:
        array = np.zeros(tuple(node["shape"]), dtype=self.record_dtypes[node["dtype"]])
        for name, column in node["fields"].items():
            array[name] = self.build_encoded(column) if column["$"] == "encoded" else self.take(column["ref"])
        return array

    def build_strings(self, node: dict[str, Any]) -> np.ndarray:
        dtype = _dtype_from_json(node["dtype"])
        values = node["values"] if dtype.kind == "U" else [bytes.fromhex(item) for item in node["values"]]
        return np.array(values, dtype=dtype).reshape(node["shape"])

    def build_objects(self, node: dict[str, Any]) -> np.ndarray:
        array = np.empty(len(node["values"]), dtype=object)
        array[:] = [self.value(item) for item in node["values"]]
        return array.reshape(node["shape"])

    def build_name(self, node: dict[str, Any]) -> Any:
        value = _resolve(node["name"])
        if not isinstance(value, (type, np.ufunc)):
            raise FormatError(f"the file names {node['name']}, which is not a class or a numpy ufunc")
        return value

    def build_object(self, node: dict[str, Any]) -> Any:
        cls = _resolve(node["class"])
        if not isinstance(cls, type):
            raise FormatError(f"{node['class']} is not a class")
        instance = cls.__new__(cls)
        self.memo[node["id"]] = instance
        return self.fill(instance, node)

    def build_call(self, node: dict[str, Any]) -> Any:
        if not _may_call(node["function"]):
            raise FormatError(f"lowbit does not call {node['function']} to rebuild a model")
        instance = _resolve(node["function"])(*[self.value(arg) for arg in node["args"]])
        self.memo[node["id"]] = instance
        return self.fill(instance, node)

    def fill(self, instance: Any, node: dict[str, Any]) -> Any:
        """State, then list and dict items, as pickle applies them."""
        _set_state(instance, self.value(node["state"]))
        for item in node.get("list_items", []):
            instance.append(self.value(item))
        for key, item in self.value(node.get("dict_items", {"$": "dict", "items": []})).items():
            instance[key] = item
        return instance


def _set_state(instance: Any, state: Any) -> None:
    """What pickle does with an object's state."""
    if state is None:
        return
    setter = getattr(instance, "__setstate__", None)
    if setter is not None:
        setter(state)
        return
    slot_state = None
    if isinstance(state, tuple) and len(state) == 2:
        state, slot_state = state
    if state:
        instance.__dict__.update(state)
    for key, item in (slot_state or {}).items():
        setattr(instance, key, item)


@functools.lru_cache(maxsize=512)
def _resolve(name: str) -> Any:
    if not _is_trusted_name(name):
        raise FormatError(f"the file names {name}; lowbit loads only scikit-learn, numpy and scipy types")
    parts = name.split(".")
    for split in range(len(parts) - 1, 0, -1):  # the longest importable module, then attributes
        try:
            value: Any = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        try:
            for attribute in parts[split:]:
                value = getattr(value, attribute)
        except AttributeError:
            break
        return value
    raise FormatError(f"{name} does not exist in this environment")


def load(document: dict[str, Any], pools: dict[str, np.ndarray], texts: list[str]) -> Any:
    """The estimator `dump` described."""
    record_dtypes = [_dtype_from_json(value) for value in document["record_dtypes"]]
    return _Reader(pools, texts, record_dtypes).value(document["graph"])
