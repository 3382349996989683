"""Small readers and writers of the JSON nodes that lowbit.families.sklearn.skeleton and
lowbit.families.sklearn.tables share: typed fields, shapes and dtypes checked as they are read,
integers narrowed as they are written, and what pickle does with an object's state."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from lowbit.errors import FormatError

MAX_DIMENSIONS = 32
MAX_ELEMENTS = 1 << 40
MAX_STRING_BYTES = 1 << 12
PLAIN_TYPES = (str, bool, int, type(None))  # exact types: numpy's float64 and str_ subclass float and str


def typed_field(node: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    """node[key], which must be of `kind` (a file's JSON is checked before it is used)."""
    value = node.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise FormatError(f"a {node.get('$')!r} node needs {key!r} of type "
                          f"{getattr(kind, '__name__', kind)}")
    return value


def shape_of(value: Any) -> tuple[int, ...]:
    if type(value) is list and len(value) == 1 and type(value[0]) is int and 0 <= value[0] <= MAX_ELEMENTS:
        return (value[0],)  # the common case (a column, a vector), checked without building sets
    if type(value) is list and len(value) <= MAX_DIMENSIONS:
        shape = tuple(value)
        if {type(size) for size in shape} <= {int} and (
                not shape or (min(shape) >= 0 and max(shape) <= MAX_ELEMENTS)):
            return shape
    raise FormatError(f"{str(value)[:80]} is not an array shape")


@functools.lru_cache(maxsize=256)
def plain_dtype(text: Any) -> np.dtype:
    """A numeric dtype (booleans, integers, floats) or a bounded text dtype, from its `.str`."""
    if not isinstance(text, str) or len(text) > 8:
        raise FormatError(f"{text!r} is not a dtype lowbit stores")
    try:
        dtype = np.dtype(text)
    except TypeError:
        raise FormatError(f"{text!r} is not a dtype") from None
    if dtype.kind in "biuf" or (dtype.kind in "US" and dtype.itemsize <= MAX_STRING_BYTES):
        return dtype
    raise FormatError(f"arrays of dtype {dtype} are not stored in lowbit files")


def smallest_integer(array: np.ndarray) -> np.ndarray:
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


def set_state(instance: Any, state: Any) -> None:
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
