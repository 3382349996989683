"""Where a fitted estimator keeps its float arrays: every one of them, as a named slot that can be
read and replaced, found by walking the fitted state (Pipelines, ColumnTransformers, ensembles,
tree nodes and all)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

MIN_ELEMENTS = 8  # smaller arrays are not worth a scale of their own
COEFFICIENTS = frozenset({"coef_", "coefs_", "dual_coef_", "components_"})  # what weight_threshold prunes
THRESHOLD_BITS = 16  # split thresholds start here: on int8 grids nearly every tree's splits move


@dataclass
class Slot:
    """One float array of the estimator: its path, and how to read and replace it.

    `min_bits`: where the ladder starts at least (split thresholds: int8 moves most splits).
    """

    path: str
    get: Callable[[], np.ndarray]
    set: Callable[[np.ndarray], None]
    min_bits: int = 8


def is_coefficient(path: str) -> bool:
    """Whether the array at `path` is a weight matrix (linear coefficients, network weights,
    dual coefficients, components): the arrays that pruning small entries makes sense for."""
    return re.sub(r"(\[[^\]]*\])+$", "", path).rpartition(".")[2] in COEFFICIENTS


def _is_float_array(value: Any) -> bool:
    return (isinstance(value, np.ndarray) and value.dtype.fields is None
            and value.dtype in (np.float64, np.float32) and value.size >= MIN_ELEMENTS)


def _tree_slots(tree: Any, path: str) -> Iterator[Slot]:
    """sklearn's Cython Tree: values and split thresholds, through its pickle state."""
    def field_slot(key: str, field: str | None) -> Slot:
        def get() -> np.ndarray:
            array = tree.__getstate__()[key]
            return (array[field] if field else array).copy()

        def put(value: np.ndarray) -> None:
            state = tree.__getstate__()
            if field:
                nodes = state["nodes"].copy()
                nodes[field] = value
                state["nodes"] = nodes
            else:
                state[key] = np.ascontiguousarray(value)
            tree.__setstate__(state)

        return Slot(f"{path}.{key}.{field}" if field else f"{path}.{key}", get, put,
                    min_bits=THRESHOLD_BITS if field == "threshold" else 8)

    yield field_slot("nodes", "threshold")
    yield field_slot("values", None)


def _structured_slots(owner: Any, name: str, array: np.ndarray, path: str) -> Iterator[Slot]:
    for field in array.dtype.names:
        if array.dtype[field] in (np.float64, np.float32) and array.size >= MIN_ELEMENTS:
            def get(field=field) -> np.ndarray:
                return getattr(owner, name)[field].copy()

            def put(value: np.ndarray, field=field) -> None:
                getattr(owner, name)[field] = value

            yield Slot(f"{path}.{field}", get, put,
                       min_bits=THRESHOLD_BITS if "threshold" in field else 8)


def _item_slot(container: Any, key: Any, path: str) -> Slot:
    def put(value: np.ndarray) -> None:
        container[key] = value

    return Slot(path, lambda: container[key], put)


def _attribute_slot(owner: Any, name: str, path: str) -> Slot:
    return Slot(path, lambda: getattr(owner, name), lambda value: setattr(owner, name, value))


def find_slots(value: Any, path: str = "model", seen: set[int] | None = None) -> Iterator[Slot]:
    """Every float array reachable from `value`, depth first, each object visited once."""
    seen = set() if seen is None else seen
    if id(value) in seen:
        return
    seen.add(id(value))
    if type(value).__name__ == "Tree" and type(value).__module__.startswith("sklearn.tree"):
        yield from _tree_slots(value, path)
        return
    for owner, key, item, child_path, by_item in _children(value, path):
        if _is_float_array(item):
            yield _item_slot(owner, key, child_path) if by_item else _attribute_slot(owner, key, child_path)
        elif isinstance(item, np.ndarray) and item.dtype.fields is not None and not by_item:
            yield from _structured_slots(owner, key, item, child_path)
        elif not isinstance(item, (np.ndarray, str, bytes, int, float, bool, type(None))):
            yield from find_slots(item, child_path, seen)


def _children(value: Any, path: str) -> Iterator[tuple[Any, Any, Any, str, bool]]:
    """(owner, key, item, path, replaced by item assignment) for each member of `value`."""
    if isinstance(value, dict):
        for key, item in list(value.items()):
            yield value, key, item, f"{path}[{key!r}]", True
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield value, index, item, f"{path}[{index}]", True
    elif isinstance(value, tuple):  # arrays in tuples cannot be replaced: only walk into objects
        for index, item in enumerate(value):
            if not isinstance(item, np.ndarray):
                yield value, index, item, f"{path}[{index}]", True
    elif type(value).__module__.startswith("sklearn") and hasattr(value, "__dict__"):
        for name, item in vars(value).items():  # parameters too: a Pipeline's fitted steps live there
            yield value, name, item, f"{path}.{name}", False
