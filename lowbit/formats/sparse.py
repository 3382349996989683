"""Sparse tensors in the lowbit format: a bitmask of the values kept and the kept values.

A pruned weight (lowbit.transform.prune) is mostly zeros. Instead of every value, the tensor file
holds `NAME#mask`, one bit per value (1 = kept), and `NAME#values`, the kept values in order,
each deflated with zlib (the kept values of a magnitude-pruned int8 weight take about 7.2 bits
each). lowbit.json's `sparse` entry records each such tensor's dtype, shape and count of kept
values; reading checks every length against it before a tensor is built, and refuses data that
would inflate past what the entry promises.

A tensor is stored so only where that is smaller than storing it whole.
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import numpy as np
import torch

from lowbit.errors import FormatError

MASK, VALUES = "#mask", "#values"  # '#' never appears in a PyTorch state-dict key
# what the record names a dtype: the safetensors header's code
DTYPES = {"I8": torch.int8, "U8": torch.uint8, "I32": torch.int32, "F32": torch.float32,
          "F16": torch.float16, "BF16": torch.bfloat16}
CODES = {dtype: code for code, dtype in DTYPES.items()}
SMALLEST = 4096  # values: a smaller tensor is not worth an entry
LEAST_ZEROS = 0.2  # share of zeros below which a tensor is not tried
MOST_VALUES = 1 << 40  # a record claiming more is refused before anything is inflated


def encode_sparse(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors to store, each mostly-zero one replaced by its mask and kept values where that
    is smaller, and the `sparse` record of lowbit.json for those replaced."""
    stored, record = {}, {}
    for name, tensor in tensors.items():
        encoded = _encoded(tensor)
        if encoded is None:
            stored[name] = tensor
            continue
        mask, values, kept = encoded
        stored[name + MASK], stored[name + VALUES] = mask, values
        record[name] = {"dtype": CODES[tensor.dtype], "shape": list(tensor.shape), "kept": kept}
    return stored, record


def _encoded(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    if tensor.dtype not in CODES or tensor.numel() < SMALLEST:
        return None
    keep = (tensor != 0).flatten()
    kept = int(keep.sum())
    if kept > (1 - LEAST_ZEROS) * tensor.numel():
        return None
    mask = _deflated(np.packbits(keep.numpy()).tobytes())
    values = _deflated(tensor.flatten()[keep].contiguous().view(torch.uint8).numpy().tobytes())
    if mask.numel() + values.numel() >= tensor.numel() * tensor.element_size():
        return None
    return mask, values, kept


def _deflated(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(zlib.compress(data, 9)), dtype=torch.uint8)


def stored_names(name: str) -> tuple[str, str]:
    """The two tensors that hold sparse tensor `name`."""
    return name + MASK, name + VALUES


def decode_sparse(name: str, mask: torch.Tensor, values: torch.Tensor, entry: dict[str, Any]) -> torch.Tensor:
    """Sparse tensor `name` rebuilt from its stored mask and values, after checking each against
    its record; anything that does not fit is a FormatError."""
    dtype, count, kept = DTYPES[entry["dtype"]], math.prod(entry["shape"]), entry["kept"]
    if count > MOST_VALUES or kept > count:
        raise FormatError(f"sparse tensor {name!r} records {kept:,} kept values of {count:,}")
    bits = np.unpackbits(np.frombuffer(_inflated(name, "mask", mask, (count + 7) // 8), dtype=np.uint8),
                         count=count).astype(bool)
    if int(bits.sum()) != kept:
        raise FormatError(f"sparse tensor {name!r}: its mask keeps {int(bits.sum()):,} values, "
                          f"{kept:,} were recorded")
    raw = _inflated(name, "values", values, kept * torch.empty((), dtype=dtype).element_size())
    dense = torch.zeros(count, dtype=dtype)
    dense[torch.from_numpy(bits)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype)
    return dense.reshape(entry["shape"])


def _inflated(name: str, part: str, stored: torch.Tensor, expected: int) -> bytes:
    """Inflate at most `expected` bytes, and refuse any other length (or trailing data)."""
    if stored.dtype != torch.uint8 or stored.dim() != 1:
        raise FormatError(f"sparse tensor {name!r}: its {part} is not a deflated byte string")
    inflater = zlib.decompressobj()
    try:
        data = inflater.decompress(stored.numpy().tobytes(), expected)
    except zlib.error as error:
        raise FormatError(f"sparse tensor {name!r}: its {part} does not inflate: {error}") from None
    if len(data) != expected or not inflater.eof or inflater.unconsumed_tail or inflater.unused_data:
        raise FormatError(f"sparse tensor {name!r}: its {part} does not hold the {expected:,} bytes "
                          "its record promises")
    return data
