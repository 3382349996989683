"""Many alike items stored as columns: a forest's trees, a boosting model's predictors, a loss curve.

The generic graph (lowbit.families.sklearn.skeleton) gives every object its own JSON nodes. A
100-tree forest is then ~6,000 nodes and ~1,400 small arrays, and took longer to rebuild than
to unpickle. A list (or object array) of at least MIN_ITEMS items of one kind (objects of one
class whose states hold the same keys, numpy scalars of one dtype, or arrays) is written instead
as one `table` node. The items, and each key of their states, are columns:

- `same`:    one plain JSON value that every item shares (a hyper-parameter);
- `each`:    one plain JSON value per item;
- `one`:     one object that every item holds (a boosting model's random state), a generic node;
- `scalars`: one numpy scalar per item, all of one dtype;
- `rows`:    one array per item, laid end to end along the first axis, in runs of items that
             are stored alike (as they are, or in the fidelity guard's encoding of each);
- `records`: one record array per item (a tree's node table), each field stored as `rows`;
- `objects`: one nested object per item (a tree's Cython `Tree`), with columns of its own.

Items holding anything else (an item twice, a pruned encoding, a class or a dict) are left to
the generic graph. Reading decodes each column once and cuts it into the items' arrays, which
are views of it. The objects, arrays and values are exactly those the generic graph gives
(tests/sklearn/test_tables.py compares them bit for bit); the same allow-lists, argument checks
and bounds checks apply to each item.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lowbit.errors import FormatError
from lowbit.families.sklearn import checks, trusted
from lowbit.families.sklearn.encodings import PRUNED, STORED_TYPES
from lowbit.families.sklearn.nodes import PLAIN_TYPES, plain_dtype, set_state, smallest_integer, typed_field

MIN_ITEMS = 8
MAX_ITEMS = 1 << 24
NOT_OBJECTS = (type, np.ufunc, list, tuple, dict, set, frozenset, bytes, str, np.ndarray, np.generic,
               np.dtype)


class _NotATable(Exception):
    """The items hold something a table does not store; the generic graph writes them."""


def _plain(value: Any) -> bool:
    return type(value) in PLAIN_TYPES or (type(value) is float and math.isfinite(value))


# ---- writing ----

@dataclass
class _Plan:
    """A table being planned. Nothing reaches the writer (its pools, memo and record dtypes)
    until `commit`, so items that turn out not to be a table leave no trace."""

    writer: Any  # lowbit.families.sklearn.skeleton._Writer
    seen: set[int] = field(default_factory=set)
    alive: list[Any] = field(default_factory=list)  # reduce temporaries: their ids stay unique
    arrays: list[tuple[dict, str, np.ndarray]] = field(default_factory=list)
    dtypes: list[tuple[dict, np.dtype]] = field(default_factory=list)
    registered: list[tuple[dict, list[Any]]] = field(default_factory=list)
    shared: list[tuple[dict, Any, str]] = field(default_factory=list)

    def register(self, node: dict[str, Any], values: list[Any]) -> None:
        """`values` get ids in the writer's memo (as the generic graph gives them), so later
        references can name them; each must be new to the graph and to this table."""
        for value in values:
            if id(value) in self.writer.memo or id(value) in self.seen:
                raise _NotATable
            self.seen.add(id(value))
        self.alive.extend(values)
        self.registered.append((node, values))

    def store(self, node: dict[str, Any], key: str, array: np.ndarray) -> None:
        self.arrays.append((node, key, array))

    def share(self, node: dict[str, Any], value: Any, path: str) -> None:
        """`value`, one object every item holds (a boosting model's random state), is written once
        by the generic graph at commit."""
        self.seen.add(id(value))
        self.shared.append((node, value, path))

    def commit(self) -> bool:
        """Write the table into the writer; False (and the writer as it was) when an object shared
        by the items turned out to hold one of the items themselves."""
        before = _Checkpoint.of(self.writer)
        for node, value, path in self.shared:
            node["value"] = self.writer.value(value, path)
        if any(id(value) in self.writer.memo for _, values in self.registered for value in values):
            before.restore(self.writer)
            return False
        for node, key, array in self.arrays:
            node[key] = self.writer.array_ref(array)
        for node, dtype in self.dtypes:
            node["dtype"] = self.writer.record_dtype(dtype)
        self.writer.alive.extend(self.alive)
        for node, values in self.registered:
            node["first_id"] = len(self.writer.memo)
            for value in values:
                self.writer.memo[id(value)] = len(self.writer.memo)
        return True


@dataclass
class _Checkpoint:
    """How far the writer's memo, pools, record dtypes, texts and kept objects had grown: each
    only grows, so cutting them back undoes what was written since."""

    memo: int
    alive: int
    texts: int
    record_dtypes: int
    pools: dict[str, int]
    pool_sizes: dict[str, int]

    @classmethod
    def of(cls, writer: Any) -> _Checkpoint:
        return cls(len(writer.memo), len(writer.alive), len(writer.texts), len(writer.record_dtypes),
                   {name: len(parts) for name, parts in writer.pools.items()}, dict(writer.pool_sizes))

    def restore(self, writer: Any) -> None:
        for key in list(writer.memo)[self.memo:]:
            del writer.memo[key]
        for key in list(writer.record_dtypes)[self.record_dtypes:]:
            del writer.record_dtypes[key]
        del writer.alive[self.alive:], writer.texts[self.texts:]
        for name in list(writer.pools):
            if name in self.pools:
                del writer.pools[name][self.pools[name]:]
            else:
                del writer.pools[name]
        writer.pool_sizes.clear()
        writer.pool_sizes.update(self.pool_sizes)


def dump_items(writer: Any, items: list[Any], path: str) -> dict[str, Any] | None:
    """The table node for a list's items (or an object array's, flattened), or None when they
    are not a table: objects, numpy scalars (a loss curve) or arrays, all alike. A list of lists
    (a boosting model's predictors per iteration) is one table with the lists' sizes."""
    if len(items) < MIN_ITEMS or len(items) > MAX_ITEMS:
        return None
    plan = _Plan(writer)
    node: dict[str, Any] = {"$": "table", "path": path}
    try:
        if all(type(item) is list for item in items):
            flat = [value for item in items for value in item]
            paths = [f"{path}[{i}][{j}]" for i, item in enumerate(items) for j in range(len(item))]
            node["groups"] = {"sizes": [len(item) for item in items]}
            plan.register(node["groups"], items)
        else:
            flat, paths = items, [f"{path}[{i}]" for i in range(len(items))]
        if not flat or any(_plain(value) for value in flat):
            return None  # plain values are plain JSON already
        node["count"] = len(flat)
        node["items"] = _column(plan, flat, paths)
    except _NotATable:
        return None
    if not _stores_each_item(node["items"]):
        return None  # the reader requires it (see `_stores_each_item`)
    return node if plan.commit() else None


def _column(plan: _Plan, values: list[Any], paths: list[str]) -> dict[str, Any]:
    first = values[0]
    if not _plain(first) and id(first) not in plan.seen and all(value is first for value in values):
        node = {"kind": "one"}
        plan.share(node, first, paths[0])
        return node
    if all(_plain(value) for value in values):
        if all(type(value) is type(first) and repr(value) == repr(first) for value in values):
            return {"kind": "same", "value": first}
        return {"kind": "each", "values": list(values)}
    if all(isinstance(value, np.generic) for value in values):
        return _scalars(plan, values)
    if all(isinstance(value, np.ndarray) for value in values):
        return _records(plan, values, paths) if first.dtype.fields is not None else _rows(plan, values, paths)
    if any(isinstance(value, NOT_OBJECTS) or value is None for value in values):
        raise _NotATable
    return _objects(plan, values, paths)


def _scalars(plan: _Plan, values: list[np.generic]) -> dict[str, Any]:
    dtype = values[0].dtype
    if dtype.kind not in "biuf" or any(value.dtype != dtype for value in values):
        raise _NotATable
    items = [value.item() for value in values]
    if dtype.kind == "f" and not all(math.isfinite(item) for item in items):
        raise _NotATable
    node = {"kind": "scalars", "dtype": dtype.str, "values": items}
    plan.register(node, values)
    return node


def _counts(arrays: list[np.ndarray]) -> np.ndarray:
    return smallest_integer(np.array([array.shape[0] for array in arrays], dtype=np.int64))


def _rows(plan: _Plan, arrays: list[np.ndarray], paths: list[str]) -> dict[str, Any]:
    first = arrays[0]
    if first.ndim == 0 or first.dtype.kind not in "biuf" or any(
            array.dtype != first.dtype or array.shape[1:] != first.shape[1:] for array in arrays):
        raise _NotATable
    if any(array.ndim > 1 and array.flags.f_contiguous and not array.flags.c_contiguous for array in arrays):
        raise _NotATable  # Fortran order is the generic graph's to keep
    node = {"kind": "rows", "dtype": first.dtype.str, "rest": list(first.shape[1:])}
    plan.register(node, arrays)
    plan.store(node, "counts", _counts(arrays))
    node["segments"] = _segments(plan, arrays, paths)
    return node


def _records(plan: _Plan, arrays: list[np.ndarray], paths: list[str]) -> dict[str, Any]:
    dtype = arrays[0].dtype
    if any(array.dtype != dtype or array.ndim != 1 for array in arrays) or any(
            dtype.fields[name][0].shape or dtype.fields[name][0].fields for name in dtype.names):
        raise _NotATable
    node: dict[str, Any] = {"kind": "records", "fields": {}}
    plan.dtypes.append((node, dtype))
    plan.register(node, arrays)
    plan.store(node, "counts", _counts(arrays))
    for name in dtype.names:
        columns = [np.ascontiguousarray(array[name]) for array in arrays]
        plan.alive.extend(columns)
        node["fields"][name] = _segments(plan, columns, [f"{path}.{name}" for path in paths])
    return node


def _storage(plan: _Plan, array: np.ndarray, path: str) -> str:
    """How one item's array is stored: 'plain', or the fidelity guard's encoding of it."""
    encoded = plan.writer.encodings.get(path)
    if encoded is None:
        return "plain"
    if encoded.encoding.startswith(PRUNED) or encoded.encoding not in STORED_TYPES or encoded.order != "C" \
            or tuple(encoded.shape) != array.shape or encoded.dtype != array.dtype.str:
        raise _NotATable
    return encoded.encoding


def _segments(plan: _Plan, arrays: list[np.ndarray], paths: list[str]) -> list[dict[str, Any]]:
    """Runs of consecutive items stored alike, each run's values laid end to end."""
    runs: list[tuple[str, list[int]]] = []
    for index, (array, path) in enumerate(zip(arrays, paths, strict=True)):
        storage = _storage(plan, array, path)
        if runs and runs[-1][0] == storage:
            runs[-1][1].append(index)
        else:
            runs.append((storage, [index]))
    segments = []
    for storage, indices in runs:
        segment = {"items": len(indices), "encoding": storage}
        if storage == "plain":
            data = np.concatenate([arrays[index].ravel() for index in indices])
            plan.store(segment, "data", smallest_integer(data) if data.dtype.kind in "iu" else data)
        else:
            parts = [plan.writer.encodings[paths[index]].parts for index in indices]
            plan.store(segment, "data", np.concatenate([part["data"].ravel() for part in parts]))
            if "scale" in parts[0]:
                plan.store(segment, "scale", np.concatenate([part["scale"].ravel() for part in parts]))
        segments.append(segment)
    return segments


def _reduce(value: Any) -> tuple[Any, tuple, Any]:
    try:
        reduced = value.__reduce_ex__(4)
    except TypeError:
        raise _NotATable from None
    if isinstance(reduced, str) or len(reduced) < 3 or any(extra is not None for extra in reduced[3:]):
        raise _NotATable
    return reduced[0], reduced[1], reduced[2]


def _objects(plan: _Plan, values: list[Any], paths: list[str]) -> dict[str, Any]:
    reductions = [_reduce(value) for value in values]
    plan.alive.append(reductions)
    function, args, _ = reductions[0]
    if getattr(function, "__name__", "") == "__newobj__":
        cls = args[0] if len(args) == 1 else None
        name = trusted.qualified_name(cls)
        if name not in trusted.CLASSES or any(reduced[1] != (cls,) or type(value) is not cls
                                              for reduced, value in zip(reductions, values, strict=True)):
            raise _NotATable
        node: dict[str, Any] = {"kind": "objects", "class": name}
    else:
        name = trusted.qualified_name(function)
        if not trusted.may_call(name) or any(
                reduced[0] is not function or len(reduced[1]) != len(args) for reduced in reductions):
            raise _NotATable
        node = {"kind": "objects", "function": name,
                "args": [_column(plan, [reduced[1][position] for reduced in reductions],
                                 [f"{path}.args[{position}]" for path in paths])
                         for position in range(len(args))]}
    plan.register(node, values)
    node["state"] = _state(plan, [reduced[2] for reduced in reductions], paths)
    return node


def _state(plan: _Plan, states: list[Any], paths: list[str]) -> dict[str, Any] | None:
    if all(state is None for state in states):
        return None
    keys = list(states[0]) if type(states[0]) is dict else None
    if keys is None or any(type(state) is not dict or list(state) != keys for state in states) \
            or any(type(key) is not str for key in keys):
        raise _NotATable
    node: dict[str, Any] = {"keys": keys}
    plan.register(node, states)
    node["columns"] = [_column(plan, [state[key] for state in states], [f"{path}.{key}" for path in paths])
                       for key in keys]
    return node


# ---- reading ----

def _fail(what: str) -> None:
    raise FormatError(f"a table's {what}")


def _register(reader: Any, node: dict[str, Any], values: list[Any]) -> None:
    first = typed_field(node, "first_id", int)
    if first < 0:
        _fail("ids are negative")
    for offset, value in enumerate(values):
        reader.memo.setdefault(first + offset, value)


PER_ITEM = ("each", "scalars", "rows", "records")


def _stores_each_item(column: Any) -> bool:
    """Whether a column (or a nested object's argument or state column) stores one value per
    item in the file itself: a JSON list or a stored array of `count` entries. The reader makes
    `count` objects only then, so the count a file claims is paid for in its own bytes (a
    few-byte table cannot ask for millions of objects)."""
    if not isinstance(column, dict):
        return False
    if column.get("kind") in PER_ITEM:
        return True
    state = column.get("state") if isinstance(column.get("state"), dict) else {}
    nested = [*(column.get("args") or []), *(state.get("columns") or [])]
    return column.get("kind") == "objects" and any(_stores_each_item(child) for child in nested)


def load_items(reader: Any, node: dict[str, Any]) -> list[Any]:
    """The items `dump_items` stored: a list of objects, or of lists of them."""
    count = typed_field(node, "count", int)
    if not 1 <= count <= MAX_ITEMS:
        _fail("item count is out of range")
    if not _stores_each_item(node.get("items")):
        _fail("items store nothing per item")
    items = _read_column(reader, typed_field(node, "items", dict), count)
    if "groups" not in node:
        return items
    groups = typed_field(node, "groups", dict)
    sizes = typed_field(groups, "sizes", list)
    if any(type(size) is not int or size < 0 for size in sizes) or sum(sizes) != count:
        _fail("groups do not hold its items")
    ends = np.cumsum(sizes).tolist()
    lists = [items[end - size:end] for size, end in zip(sizes, ends, strict=True)]
    _register(reader, groups, lists)
    return lists


def _read_column(reader: Any, column: Any, count: int) -> list[Any]:
    if not isinstance(column, dict):
        _fail("column is not an object")
    read = COLUMN_READERS.get(column.get("kind"))
    if read is None:
        _fail(f"column kind {str(column.get('kind'))[:40]!r} is unknown")
    return read(reader, column, count)


def _read_same(_: Any, column: dict[str, Any], count: int) -> list[Any]:
    value = column.get("value")
    if not _plain(value):
        _fail("shared value is not a plain value")
    return [value] * count


def _read_one(reader: Any, column: dict[str, Any], count: int) -> list[Any]:
    return [reader.value(column.get("value"))] * count


def _read_each(_: Any, column: dict[str, Any], count: int) -> list[Any]:
    values = typed_field(column, "values", list)
    if len(values) != count or not all(_plain(value) for value in values):
        _fail("column does not hold one plain value per item")
    return values


def _read_scalars(reader: Any, column: dict[str, Any], count: int) -> list[Any]:
    dtype, values = plain_dtype(column.get("dtype")), typed_field(column, "values", list)
    if dtype.kind not in "biuf" or len(values) != count or not all(
            type(value) in (int, float, bool) for value in values):
        _fail("scalars are not one number per item")
    scalars = [dtype.type(value) for value in values]
    _register(reader, column, scalars)
    return scalars


def _read_counts(reader: Any, column: dict[str, Any], count: int) -> np.ndarray:
    counts = reader.take(column.get("counts"))
    if counts.dtype.kind not in "iu" or counts.shape != (count,) or (counts.size and counts.min() < 0):
        _fail("row counts are not one count per item")
    return counts.astype(np.int64)


def _readable_as(data: np.ndarray, dtype: np.dtype, encoding: str) -> bool:
    """Stored values the column's dtype holds exactly: integers narrowed by the writer, or
    floats and booleans of the very same type."""
    if encoding == "plain" and data.dtype.kind in "iu" and dtype.kind in "iu":
        limits = np.iinfo(dtype)
        return not data.size or (int(data.min()) >= limits.min and int(data.max()) <= limits.max)
    return data.dtype.kind == dtype.kind and data.dtype.itemsize == dtype.itemsize


def _decoded(reader: Any, segment: Any, rows: np.ndarray, width: int, dtype: np.dtype,
             per_item: bool) -> np.ndarray:
    """One run of items' values, flat: `rows` are the items' leading sizes and `width` the
    values per row. Integer encodings have a scale per row, or per item (`per_item`) for
    one-dimensional arrays, as lowbit.families.sklearn.encodings gives them."""
    encoding = typed_field(segment, "encoding", str)
    if encoding != "plain" and encoding not in STORED_TYPES:
        _fail(f"encoding {encoding[:40]!r} is unknown")
    data = reader.take(segment.get("data"))
    if data.ndim != 1 or data.size != int(rows.sum()) * width:
        _fail("stored values do not fill its rows")
    stored = STORED_TYPES.get(encoding)
    if (data.dtype != stored) if stored is not None else not _readable_as(data, dtype, encoding):
        _fail(f"{encoding} values of {data.dtype} cannot be read as {dtype}")
    if encoding not in ("int8-rows", "int16-rows"):
        return data
    scale = reader.take(segment.get("scale"))
    repeats = rows if per_item else np.full(int(rows.sum()), width)
    if scale.dtype != np.float64 or scale.shape != repeats.shape:
        _fail("scales are not one float64 per row")
    return data.astype(np.float64) * np.repeat(scale, repeats)


def _laid_end_to_end(reader: Any, segments: Any, counts: np.ndarray, rest: tuple[int, ...],
                     dtype: np.dtype) -> np.ndarray:
    """Every item's values, in item order, decoded into one flat array of `dtype`; `rest` is
    each array's shape after its first axis."""
    if not isinstance(segments, list):
        _fail("segments are not a list")
    pieces, start = [], 0
    for segment in segments:
        items = typed_field(segment, "items", int) if isinstance(segment, dict) else -1
        if not 1 <= items <= counts.size - start:
            _fail("segments do not cover its items")
        pieces.append(_decoded(reader, segment, counts[start:start + items], math.prod(rest), dtype,
                               per_item=not rest))
        start += items
    if start != counts.size:
        _fail("segments do not cover its items")
    flat = np.empty(sum(piece.size for piece in pieces), dtype)
    position = 0
    for piece in pieces:
        flat[position:position + piece.size] = piece
        position += piece.size
    return flat


def _cut(flat: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
    return np.split(flat, np.cumsum(counts)[:-1]) if counts.size else []


def _read_rows(reader: Any, column: dict[str, Any], count: int) -> list[Any]:
    dtype, rest = plain_dtype(column.get("dtype")), typed_field(column, "rest", list)
    if dtype.kind not in "biuf" or len(rest) > 8 or any(type(size) is not int or size < 0 for size in rest):
        _fail("rows have no numeric dtype or shape")
    counts = _read_counts(reader, column, count)
    flat = _laid_end_to_end(reader, column.get("segments"), counts, tuple(rest), dtype)
    arrays = _cut(flat.reshape(int(counts.sum()), *rest), counts)
    _register(reader, column, arrays)
    return arrays


def _read_records(reader: Any, column: dict[str, Any], count: int) -> list[Any]:
    index = typed_field(column, "dtype", int)
    if not 0 <= index < len(reader.record_dtypes):
        _fail(f"record dtype {index} is not in the file")
    dtype, fields = reader.record_dtypes[index], typed_field(column, "fields", dict)
    if list(fields) != list(dtype.names):
        _fail("records do not store each field of their dtype once, in order")
    counts = _read_counts(reader, column, count)
    columns = {name: _laid_end_to_end(reader, segments, counts, (), dtype.fields[name][0])
               for name, segments in fields.items()}
    table = np.zeros(int(counts.sum()), dtype)
    for name, values in columns.items():
        table[name] = values
    arrays = _cut(table, counts)
    _register(reader, column, arrays)
    return arrays


def _new_objects(reader: Any, column: dict[str, Any], count: int) -> list[Any]:
    if "class" in column:
        name = column.get("class")
        if name not in trusted.CLASSES:
            _fail(f"class {str(name)[:80]!r} is not one lowbit makes")
        cls = trusted.resolve_type(name)
        return [cls.__new__(cls) for _ in range(count)]
    name = column.get("function")
    if not trusted.may_call(name):
        _fail(f"constructor {str(name)[:80]!r} is not one lowbit calls")
    args = [_read_column(reader, arg, count) for arg in typed_field(column, "args", list)]
    return [trusted.call(name, tuple(arg[index] for arg in args)) for index in range(count)]


def _read_objects(reader: Any, column: dict[str, Any], count: int) -> list[Any]:
    state = column.get("state")
    states = [None] * count if state is None else _read_states(reader, state, count)  # checked first
    instances = _new_objects(reader, column, count)
    _register(reader, column, instances)
    for instance, values in zip(instances, states, strict=True):
        checks.check_state(instance, values)  # a Tree without its state is refused, as in the generic graph
        set_state(instance, values)
    reader.built.extend(instances)
    return instances


def _read_states(reader: Any, node: Any, count: int) -> list[dict[str, Any]]:
    if not isinstance(node, dict):
        _fail("state is not an object")
    keys, columns = typed_field(node, "keys", list), typed_field(node, "columns", list)
    if len(keys) != len(columns) or len(set(map(str, keys))) != len(keys) or not all(
            type(key) is str for key in keys):
        _fail("state keys do not match its columns")
    values = [_read_column(reader, column, count) for column in columns]
    states = [dict(zip(keys, row, strict=True)) for row in zip(*values, strict=True)] if keys \
        else [{} for _ in range(count)]
    _register(reader, node, states)
    return states


COLUMN_READERS: dict[str, Callable[[Any, dict[str, Any], int], list[Any]]] = {
    "same": _read_same,
    "one": _read_one,
    "each": _read_each,
    "scalars": _read_scalars,
    "rows": _read_rows,
    "records": _read_records,
    "objects": _read_objects,
}


def encoded_arrays(node: Any) -> list[dict[str, Any]]:
    """For `lowbit inspect`: one entry per run of items stored in an encoding, shaped like the
    generic graph's encoded nodes (the run's values flat)."""
    found: list[dict[str, Any]] = []
    stack: list[tuple[Any, str]] = [(node.get("items"), str(node.get("path", "?")) + "[*]")]
    while stack:
        column, path = stack.pop()
        if not isinstance(column, dict):
            continue
        if column.get("kind") == "objects":
            state = column.get("state") if isinstance(column.get("state"), dict) else {}
            stack.extend((child, f"{path}.{key}") for key, child in zip(
                state.get("keys", []), state.get("columns", []), strict=False))
        runs = [(path, column.get("segments"))] if column.get("kind") == "rows" else \
            [(f"{path}.{name}", segments) for name, segments in column.get("fields", {}).items()] \
            if column.get("kind") == "records" else []
        for run_path, segments in runs:
            for segment in segments if isinstance(segments, list) else []:
                if isinstance(segment, dict) and segment.get("encoding") not in ("plain", None):
                    parts = {name: segment[name] for name in ("data", "scale") if name in segment}
                    data = parts.get("data")
                    found.append({"path": f"{run_path} ({segment.get('items')} items)",
                                  "encoding": segment["encoding"], "parts": parts,
                                  "shape": data[2] if isinstance(data, list) and len(data) == 3 else None})
    return found
