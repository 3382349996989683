"""How one float array of a fitted estimator is stored: a ladder from small to exact.

`int8-rows` / `int16-rows`: symmetric integers with one scale per row of a matrix (one for a
vector), `float32`, and `exact` (the original bytes). The fidelity guard climbs the ladder,
array by array, until no prediction changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LADDERS = {
    8: ("int8-rows", "int16-rows", "float32", "exact"),
    16: ("int16-rows", "float32", "exact"),
    32: ("float32", "exact"),
}
INTEGER_TYPES = {"int8-rows": np.int8, "int16-rows": np.int16}


@dataclass
class Encoded:
    """An array as stored: its encoding, the stored parts, and what to rebuild."""

    encoding: str
    parts: dict[str, np.ndarray]
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return sum(part.nbytes for part in self.parts.values())


def ladder(bits: int, array: np.ndarray) -> tuple[str, ...]:
    """The encodings to try for `array`, smallest first; integer grids only for float arrays
    that are finite (an inf or NaN has no place on them)."""
    steps = LADDERS[bits]
    if array.dtype == np.float32:
        steps = tuple(step for step in steps if step != "float32")
    if not np.isfinite(array).all():
        steps = tuple(step for step in steps if step not in INTEGER_TYPES)
    return steps or ("exact",)


def encode(array: np.ndarray, encoding: str) -> Encoded:
    array = np.ascontiguousarray(array)
    if encoding == "exact":
        return Encoded(encoding, {"data": array}, array.dtype.str, array.shape)
    if encoding in ("float16", "float32"):
        return Encoded(encoding, {"data": array.astype(encoding)}, array.dtype.str, array.shape)
    integer = INTEGER_TYPES[encoding]
    qmax = np.iinfo(integer).max
    rows = array.reshape(array.shape[0], -1) if array.ndim > 1 else array.reshape(1, -1)
    scale = np.abs(rows).max(axis=1, keepdims=True) / qmax
    scale[scale == 0] = 1.0
    data = np.clip(np.rint(rows / scale), -qmax, qmax).astype(integer)
    return Encoded(encoding, {"data": data, "scale": scale.astype(np.float64)}, array.dtype.str, array.shape)


def decode(encoded: Encoded) -> np.ndarray:
    """The array the estimator computes with, in its original dtype and shape."""
    data = encoded.parts["data"]
    if encoded.encoding in INTEGER_TYPES:
        data = data.astype(np.float64) * encoded.parts["scale"]
    return np.asarray(data, dtype=np.dtype(encoded.dtype)).reshape(encoded.shape)
