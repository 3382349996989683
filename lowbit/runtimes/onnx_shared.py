"""One copy of the weights in an ONNX Runtime folder: model.onnx refers to lowbit's tensor file.

The graphs lowbit builds store each weight with the bytes lowbit's tensor file holds
(lowbit.runtimes.onnx_graph). When a folder keeps both, `share_stored` turns each initializer
whose bytes the tensor file already holds into an ONNX external-data reference (file, offset,
length) into it, so the weights are on disk once. Plain ONNX Runtime opens model.onnx and reads
them from the file beside it, as ONNX's external data works.

lowbit itself never lets ONNX Runtime open a file: `inline_stored` copies the referenced bytes,
from files whose size and sha256 it checked, back into the graph before a session opens, and
refuses a reference to any file the folder does not list.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from lowbit.errors import FormatError

MIN_SHARED_BYTES = 1024  # smaller tensors (norm weights of small models, zero points) stay inline


class StoredBytes(NamedTuple):
    """Where a tensor's bytes lie in a folder: the file, the offset of the first byte, the length."""

    file: str
    offset: int
    length: int


def _external(tensor: Any, where: StoredBytes) -> None:
    from onnx import TensorProto

    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in (("location", where.file), ("offset", where.offset), ("length", where.length)):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, str(value)


def share_stored(graph: bytes, regions: Iterable[StoredBytes], read: Callable[[str], bytes]) -> bytes:
    """`graph` with every initializer of at least MIN_SHARED_BYTES whose raw bytes equal one of
    `regions` (`read(file)` gives a file's bytes) kept there, as external data."""
    import onnx

    files: dict[str, bytes] = {}
    by_digest: dict[str, StoredBytes] = {}
    for region in regions:
        if region.length >= MIN_SHARED_BYTES:
            if region.file not in files:
                files[region.file] = read(region.file)
            data = files[region.file]
            digest = hashlib.sha256(memoryview(data)[region.offset:region.offset + region.length]).hexdigest()
            by_digest.setdefault(digest, region)
    model = onnx.load_model_from_string(graph)
    shared = 0
    for tensor in model.graph.initializer:
        if len(tensor.raw_data) >= MIN_SHARED_BYTES:
            where = by_digest.get(hashlib.sha256(tensor.raw_data).hexdigest())
            if where is not None:
                _external(tensor, where)
                shared += 1
    return model.SerializeToString() if shared else graph


def _reference(tensor: Any) -> dict[str, str]:
    """An external tensor's key/value entries as text (protobuf hands an entry that is not valid
    UTF-8 over as bytes; decoded, it names no file of the folder and is refused as such)."""
    return {_text(entry.key): _text(entry.value) for entry in tensor.external_data}


def _text(value: str | bytes) -> str:
    return value if isinstance(value, str) else bytes(value).decode("utf-8", "replace")


def _region(tensor: Any, size: int, where: str) -> tuple[int, int]:
    """(offset, length) of an external tensor inside a file of `size` bytes, checked."""
    reference = _reference(tensor)
    try:
        offset = int(reference.get("offset", 0))
        length = int(reference.get("length", size - offset))
    except ValueError:
        raise FormatError(f"{where}: tensor {tensor.name!r} has a malformed external-data entry") from None
    if offset < 0 or length < 0 or offset + length > size:
        raise FormatError(f"{where}: tensor {tensor.name!r} points outside {reference['location']}")
    return offset, length


def inline_stored(graph: bytes, read: Callable[[str], bytes], where: str) -> bytes:
    """`graph` with the tensors it keeps in the folder's files copied into it. `read(file)` gives
    a file the folder lists, after checking its size and sha256 (and refuses any other)."""
    import onnx

    try:
        model = onnx.load_model_from_string(graph)
    except Exception as error:  # noqa: BLE001 - protobuf's decode errors are untyped
        raise FormatError(f"{where} is not an ONNX model: {str(error)[:200]}") from None
    external = [tensor for tensor in model.graph.initializer
                if tensor.data_location == onnx.TensorProto.EXTERNAL]
    if not external:
        return graph
    files: dict[str, bytes] = {}
    for tensor in external:
        location = _reference(tensor).get("location", "")
        if not location or any(mark in location for mark in ("/", "\\", "..")):
            raise FormatError(f"{where}: tensor {tensor.name!r} refers to {location!r}, not a file of "
                              "its folder")
        if location not in files:
            files[location] = read(location)  # checked against the folder's manifest
        data = files[location]
        offset, length = _region(tensor, len(data), where)
        tensor.raw_data = data[offset:offset + length]
        tensor.ClearField("data_location")
        del tensor.external_data[:]
    return model.SerializeToString()
