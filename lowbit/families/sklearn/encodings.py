"""How one float array of a fitted estimator is stored: a ladder from small to exact.

`int8-rows` / `int16-rows`: symmetric integers with one scale per row of a matrix (one for a
vector), `float32`, and `exact` (the original bytes). The fidelity guard climbs the ladder,
array by array, until no prediction changes.

With a weight threshold, coefficient arrays first try `pruned-` rungs: entries smaller than the
threshold in magnitude (or rounding to zero) become zero, and only the others are stored, with
a bitmask of where they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

LADDERS = {
    8: ("int8-rows", "int16-rows", "float32", "exact"),
    16: ("int16-rows", "float32", "exact"),
    32: ("float32", "exact"),
}
INTEGER_TYPES = {"int8-rows": np.int8, "int16-rows": np.int16}
PRUNED = "pruned-"


@dataclass
class Encoded:
    """An array as stored: its encoding, the stored parts, and what to rebuild (with its memory
    order: a Fortran-ordered coef_ copied to C order would be copied back on every predict)."""

    encoding: str
    parts: dict[str, np.ndarray]
    dtype: str
    shape: tuple[int, ...]
    order: str = "C"

    @property
    def nbytes(self) -> int:
        return sum(part.nbytes for part in self.parts.values())


def ladder(bits: int, array: np.ndarray, pruned: bool = False) -> tuple[str, ...]:
    """The encodings to try for `array`, smallest first; integer grids only for float arrays
    that are finite (an inf or NaN has no place on them). `pruned` puts the pruned rungs first."""
    steps = LADDERS[bits]
    if array.dtype == np.float32:
        steps = tuple(step for step in steps if step != "float32")
    if not np.isfinite(array).all():
        steps = tuple(step for step in steps if step not in INTEGER_TYPES)
        pruned = False
    if array.size and array.dtype.kind == "f" and np.all(array > 0):
        steps = tuple(step for step in steps if _keeps_relative_precision(array, step))
        pruned = False
    if pruned:
        steps = tuple(PRUNED + step for step in steps if step != "exact") + steps
    return steps or ("exact",)


POSITIVE_RELATIVE_ERROR = 1e-3  # largest relative change of an entry of an all-positive array


def _keeps_relative_precision(array: np.ndarray, step: str) -> bool:
    """Whether `step` keeps every entry of an all-positive array within POSITIVE_RELATIVE_ERROR
    of itself. Variances, scales and counts are divided by or logged: a small one rounded on a
    grid sized for the largest (or to zero, which makes NaN) moves predictions on inputs no check
    set holds, so such a rung is never offered for them, whatever the data."""
    with np.errstate(all="ignore"):
        decoded = decode(encode(array, step))
        return step == "exact" or bool(np.all(np.abs(decoded - array) <= POSITIVE_RELATIVE_ERROR * array))


def _rows(array: np.ndarray) -> np.ndarray:
    return array.reshape(array.shape[0], -1) if array.ndim > 1 else array.reshape(1, -1)


def _on_grid(rows: np.ndarray, integer: type) -> tuple[np.ndarray, np.ndarray]:
    qmax = np.iinfo(integer).max
    scale = np.abs(rows).max(axis=1, keepdims=True) / qmax
    scale[scale == 0] = 1.0
    return np.clip(np.rint(rows / scale), -qmax, qmax).astype(integer), scale.astype(np.float64)


def encode(array: np.ndarray, encoding: str, threshold: float = 0.0) -> Encoded:
    """`array` stored as `encoding`; `threshold` is the pruning threshold of `pruned-` rungs."""
    order = memory_order(array)
    array = np.ascontiguousarray(array)
    if encoding == "exact":
        return Encoded(encoding, {"data": array}, array.dtype.str, array.shape, order)
    step = encoding.removeprefix(PRUNED)
    rows = _rows(array)
    if encoding.startswith(PRUNED):
        rows = np.where(np.abs(rows) < threshold, 0.0, rows)
    if step == "float32":
        parts = {"data": rows.astype(np.float32)}
    else:
        data, scale = _on_grid(rows, INTEGER_TYPES[step])
        parts = {"data": data, "scale": scale}
    if encoding.startswith(PRUNED):
        kept = parts["data"] != 0
        parts["mask"] = np.packbits(kept.ravel())
        parts["data"] = parts["data"][kept]
    return Encoded(encoding, parts, array.dtype.str, array.shape, order)


def memory_order(array: np.ndarray) -> str:
    return "F" if array.flags.f_contiguous and not array.flags.c_contiguous else "C"


def decode(encoded: Encoded) -> np.ndarray:
    """The array the estimator computes with, in its original dtype and shape."""
    parts = encoded.parts
    data = parts["data"]
    if "mask" in parts:  # pruned: zeros, then the kept values where the mask says
        size = int(np.prod(encoded.shape))
        kept = np.unpackbits(parts["mask"], count=size).astype(bool)
        dense = np.zeros(size, dtype=data.dtype)
        dense[kept] = data
        data = dense.reshape(parts["scale"].shape[0], -1) if "scale" in parts else dense
    if "scale" in parts:
        data = data.astype(np.float64) * parts["scale"]
    array = np.asarray(data, dtype=np.dtype(encoded.dtype)).reshape(encoded.shape)
    return np.asfortranarray(array) if encoded.order == "F" else array


def sparsity(encoded: Encoded) -> float | None:
    """The share of entries a pruned encoding set to zero (None when not pruned)."""
    if "mask" not in encoded.parts:
        return None
    size = int(np.prod(encoded.shape))
    return 1.0 - len(encoded.parts["data"]) / size if size else 0.0


PARTS = {"exact": {"data"}, "float32": {"data"}, "int8-rows": {"data", "scale"},
         "int16-rows": {"data", "scale"}}
STORED_TYPES = {"exact": None, "float32": np.float32, "int8-rows": np.int8, "int16-rows": np.int16}


def check_encoded(encoded: Encoded) -> None:
    """Raise FormatError unless `encoded`'s parts fit its encoding and shape: a file's sizes are
    checked before `decode` allocates anything from them."""
    from lowbit.errors import FormatError

    step = encoded.encoding.removeprefix(PRUNED)
    pruned = encoded.encoding.startswith(PRUNED)
    if step not in PARTS or (pruned and step == "exact"):
        raise FormatError(f"unknown array encoding {encoded.encoding!r}")
    parts, size = encoded.parts, math.prod(encoded.shape)
    if set(parts) != PARTS[step] | ({"mask"} if pruned else set()):
        raise FormatError(f"a {encoded.encoding} array needs the parts {sorted(PARTS[step])}")
    if encoded.order not in ("C", "F") or np.dtype(encoded.dtype).kind not in "biuf":
        raise FormatError("an encoded array needs order C or F and a numeric dtype")
    stored = STORED_TYPES[step]
    if stored is not None and parts["data"].dtype != stored:
        raise FormatError(f"a {encoded.encoding} array stores {np.dtype(stored)} values")
    rows = encoded.shape[0] if len(encoded.shape) > 1 else 1
    if "scale" in parts and (parts["scale"].dtype != np.float64 or parts["scale"].shape != (rows, 1)):
        raise FormatError("an array's scales must be one float64 per row")
    if not pruned:
        expected = encoded.shape if step == "exact" else (rows, size // rows if rows else 0)
        if parts["data"].shape != tuple(expected):
            raise FormatError("an array's stored values do not fill its shape")
        return
    mask = parts["mask"]
    if mask.dtype != np.uint8 or mask.ndim != 1 or mask.size != (size + 7) // 8:
        raise FormatError("a pruned array's mask must hold one bit per element")
    kept = int(np.unpackbits(mask, count=size).sum())
    if parts["data"].ndim != 1 or parts["data"].size != kept:
        raise FormatError("a pruned array must store one value per set bit of its mask")
