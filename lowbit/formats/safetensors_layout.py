"""Where each tensor's bytes lie in a safetensors file, read from its header alone: an 8-byte
little-endian header length, a JSON header giving each tensor's dtype, shape and `data_offsets`
(from the end of the header), then the data. Every range is checked against the file's size and
the tensor's dtype and shape, so a crafted header cannot make a reader run off the file."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lowbit.errors import FormatError

MAX_HEADER_BYTES = 100 << 20
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
Stored = tuple[torch.dtype, tuple[int, ...], int, int]  # dtype, shape, first and end byte
Layout = tuple[int, dict[str, Stored]]  # where the data starts, each tensor's Stored


def layout(path: Path) -> Layout:
    """(where the data starts, {tensor name: its dtype, shape and byte range}) of `path`."""
    try:
        with path.open("rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if length > MAX_HEADER_BYTES:
                raise ValueError(f"a {length}-byte header")
            header = json.loads(handle.read(length))
        start, size, stored = 8 + length, path.stat().st_size, {}
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            dtype, shape, (first, end) = DTYPES[entry["dtype"]], tuple(entry["shape"]), entry["data_offsets"]
            if not (0 <= first <= end and start + end <= size
                    and end - first == torch.Size(shape).numel() * dtype.itemsize):
                raise ValueError(f"{key}'s bytes {first}..{end} do not fit its shape or the file")
            stored[key] = (dtype, shape, first, end)
        return start, stored
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise FormatError(f"{path} is not a readable safetensors file: {error}") from None


def read_tensor(path: Path, key: str, known: Layout | None = None) -> torch.Tensor:
    """One tensor of `path` (whose `layout` may be `known`), read into fresh memory (not
    memory-mapped: the file's pages never count towards the process's memory)."""
    start, stored = known or layout(path)
    dtype, shape, first, end = stored[key]
    tensor = torch.empty(shape, dtype=dtype)
    with path.open("rb") as handle:
        handle.seek(start + first)
        if handle.readinto(tensor.reshape(-1).view(torch.uint8).numpy()) != end - first:
            raise FormatError(f"{path} is truncated: {key} is cut short")
    return tensor
