"""The lowbit file for a scikit-learn model: one zip, no pickle.

    lowbit.json          format, version, estimator class, sha256 of every other entry, the
                         fidelity report (per-array encodings, fallbacks)
    skeleton.json        the estimator's object graph (lowbit.families.sklearn.skeleton): plain JSON;
                         since format 3, many alike items (a forest's trees) as one table
                         (lowbit.families.sklearn.tables)
    arrays.safetensors   every array: quantized ones as their parts (int8/int16 rows and
                         scales), tree node tables one column each, integers narrowed exactly
    vocabulary/N.txt     a text vectorizer's terms in column order, one per line

Written to a temporary file and renamed into place; every entry is checked against its sha256
before anything is built, and loading resolves only scikit-learn, numpy and scipy names.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from lowbit.errors import ChecksumError, FormatError, NotSmallerError
from lowbit.families.sklearn import probe, skeleton, tables
from lowbit.families.sklearn.encodings import Encoded
from lowbit.families.sklearn.manifest import validate_manifest
from lowbit.formats.atomic import atomic_file
from lowbit.formats.manifest import parse_json

FORMAT, VERSION = "lowbit-sklearn", 3
READABLE_VERSIONS = (2, 3)  # 3 adds tables (lowbit.families.sklearn.tables); 2 files read as they are
MAX_MANIFEST_BYTES = 16 << 20
MAX_INFLATION = 50  # entries may inflate to 50x the file: real files measured 2-6x
STORE_BELOW_SAVING = 0.10  # an entry deflate shrinks by less is stored: inflating it costs load time


def _compression(data: bytes) -> int:
    """ZIP_STORED for an entry deflate barely shrinks (an MLP's float arrays: 8%, 0.18 ms of a
    2 ms load to inflate), ZIP_DEFLATED otherwise."""
    deflated = len(zlib.compress(data, 9))
    return zipfile.ZIP_STORED if deflated > (1 - STORE_BELOW_SAVING) * len(data) else zipfile.ZIP_DEFLATED


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _class_path(estimator: Any) -> str:
    return f"{type(estimator).__module__}.{type(estimator).__qualname__}"


def write_file(estimator: Any, encodings: dict[str, Encoded], path: str | os.PathLike,
               report: dict[str, Any], overwrite: bool = False, smaller_than: int | None = None) -> Path:
    """Save atomically; `encodings` maps slot paths to how each quantized array is stored. With
    `smaller_than` (bytes), a file that would not be smaller is not written (NotSmallerError)."""
    from safetensors.numpy import save as save_arrays

    path = Path(path)
    if path.exists() and not overwrite:
        raise FormatError(f"{path} already exists; choose another path or pass overwrite=True")
    root, arrays, texts = skeleton.dump(estimator, encodings)
    entries = {"skeleton.json": json.dumps(root, separators=(",", ":")).encode(),
               "arrays.safetensors": save_arrays(arrays) if arrays else b""}
    entries.update({f"vocabulary/{index}.txt": text.encode() for index, text in enumerate(texts)})
    manifest = {"format": FORMAT, "version": VERSION, "estimator": _class_path(estimator), "report": report,
                "versions": _versions(), "probe": probe.record(estimator),
                "sha256": {name: _sha256(data) for name, data in entries.items()},
                "sizes": {name: len(data) for name, data in entries.items()}}
    with atomic_file(path, overwrite) as staging:
        with zipfile.ZipFile(staging, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
            archive.writestr("lowbit.json", json.dumps(manifest, separators=(",", ":")))
            for name, data in entries.items():
                archive.writestr(name, data, compress_type=_compression(data))
        size = Path(staging).stat().st_size
        if smaller_than is not None and size >= smaller_than:
            raise NotSmallerError(f"the lowbit file would be {size:,} bytes, no smaller than the original's "
                                  f"{smaller_than:,}: the arrays the fidelity guard could narrow do not "
                                  "outweigh the file's structure (a tiny model, or one whose arrays had to "
                                  "stay wide), so nothing was written")
    return path


def _versions() -> dict[str, str]:
    import sklearn

    from lowbit.version import __version__

    return {"lowbit": __version__, "scikit-learn": sklearn.__version__, "numpy": np.__version__}


def is_lowbit_file(path: str | os.PathLike) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return {"lowbit.json", "skeleton.json"} <= set(archive.namelist())
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def _open_archive(path: str | os.PathLike) -> zipfile.ZipFile:
    if not Path(path).is_file():
        raise FormatError(f"{path} is not a file")
    try:
        return zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile, ValueError, EOFError) as error:
        raise FormatError(f"{path} is not a lowbit scikit-learn file: {error}") from None


def _read_entry(archive: zipfile.ZipFile, name: str, limit: int) -> bytes:
    """One entry's bytes, refused before inflating when its declared size passes `limit`, and
    read in chunks that stop at the declared size (a zip bomb cannot fill memory)."""
    try:
        info = archive.getinfo(name)
    except KeyError:
        raise FormatError(f"the file has no entry {name}") from None
    if info.file_size > limit:
        raise FormatError(f"entry {name} declares {info.file_size:,} bytes, over its bound of {limit:,}")
    try:
        with archive.open(info) as handle:
            data = handle.read(info.file_size + 1)  # bounded above; one byte more shows an overflow
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, RuntimeError,
            zlib.error) as error:
        raise FormatError(f"entry {name} cannot be read: {error}") from None
    if len(data) > info.file_size:
        raise FormatError(f"entry {name} inflates past its declared size")
    return data


def _manifest_from(archive: zipfile.ZipFile, path: str | os.PathLike) -> dict[str, Any]:
    manifest = parse_json(_read_entry(archive, "lowbit.json", MAX_MANIFEST_BYTES), f"{path}: lowbit.json",
                          None)  # its schema (lowbit.families.sklearn.manifest) bounds the nesting
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise FormatError(f"{path} is not a lowbit scikit-learn file")
    if manifest.get("version") not in READABLE_VERSIONS:
        raise FormatError(f"{path} has format version {manifest.get('version')!r}; "
                          f"this lowbit reads {' and '.join(map(str, READABLE_VERSIONS))}")
    return validate_manifest(manifest, f"{path}: lowbit.json")


def _entry_limits(archive: zipfile.ZipFile, manifest: dict[str, Any],
                  path: str | os.PathLike) -> dict[str, int]:
    """Each entry's size bound: the size lowbit.json records (when it does), and all together at
    most MAX_INFLATION times the file's own size."""
    limits = {}
    for name in manifest["sha256"]:
        try:
            declared = archive.getinfo(name).file_size
        except KeyError:
            raise FormatError(f"{path}: entry {name} is missing") from None
        recorded = manifest["sizes"].get(name, declared)
        if recorded != declared:
            raise FormatError(f"{path}: entry {name} declares {declared:,} bytes; "
                              f"lowbit.json recorded {recorded:,}")
        limits[name] = declared
    budget = MAX_INFLATION * Path(path).stat().st_size + MAX_MANIFEST_BYTES
    if sum(limits.values()) > budget:
        raise FormatError(f"{path}: its entries would inflate to {sum(limits.values()):,} bytes, more than "
                          f"{MAX_INFLATION}x the file; it is corrupt or a zip bomb")
    return limits


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """lowbit.json, checked: format, version, and an entry list lowbit knows how to read."""
    with _open_archive(path) as archive:
        return _manifest_from(archive, path)


def _verified_entries(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, bytes]]:
    """lowbit.json and every entry it lists, each bounded in size and checked against its sha256."""
    with _open_archive(path) as archive:
        manifest = _manifest_from(archive, path)
        limits = _entry_limits(archive, manifest, path)
        entries = {name: _read_entry(archive, name, limit) for name, limit in limits.items()}
    for name, data in entries.items():
        if _sha256(data) != manifest["sha256"][name]:
            raise ChecksumError(f"{path}: {name} does not match its sha256; the file is corrupt")
    return manifest, entries


def _texts(entries: dict[str, bytes], path: str | os.PathLike) -> list[str]:
    count = sum(name.startswith("vocabulary/") for name in entries)
    try:
        return [entries[f"vocabulary/{index}.txt"].decode("utf-8") for index in range(count)]
    except KeyError as error:
        raise FormatError(f"{path}: vocabulary entry {error} is missing") from None
    except UnicodeDecodeError as error:
        raise FormatError(f"{path}: a vocabulary is not UTF-8 text: {error}") from None


def _pools(data: bytes, path: str | os.PathLike) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load as load_arrays

    if not data:
        return {}
    try:
        pools = load_arrays(data)
    except (SafetensorError, ValueError, TypeError, OverflowError) as error:
        raise FormatError(f"{path}: arrays.safetensors is not readable: {error}") from None
    for name, pool in pools.items():
        if pool.ndim != 1 or pool.dtype.name != name:
            raise FormatError(f"{path}: array pool {name!r} is not a 1-d array of {name}")
    return pools


def read_file(path: str | os.PathLike) -> Any:
    """Rebuild the estimator: sizes and checksums first, then the object graph with its arrays
    and terms (lowbit.families.sklearn.skeleton). Every failure is a FormatError."""
    manifest, entries = _verified_entries(path)
    pools = _pools(entries["arrays.safetensors"], path)
    document = parse_json(entries["skeleton.json"], f"{path}: skeleton.json", None)
    try:
        estimator = skeleton.load(document, pools, _texts(entries, path))
        probe.check(estimator, manifest["probe"])
    except FormatError as error:
        raise FormatError(f"{path}: {error}") from None
    return estimator


def describe_file(path: str | os.PathLike, verify: bool = False) -> dict[str, Any]:
    """What `lowbit inspect` shows: the estimator, the fidelity report, and per quantized array
    its encoding, shape and stored bytes. Sizes and checksums are always checked; `verify` also
    rebuilds the model."""
    manifest, entries = _verified_entries(path)
    if verify:
        read_file(path)
    document = parse_json(entries["skeleton.json"], f"{path}: skeleton.json", None)
    if not isinstance(document, dict):
        raise FormatError(f"{path}: skeleton.json is not a lowbit object graph")
    try:
        arrays = [{"path": str(node.get("path", "?")), "encoding": str(node["encoding"]),
                   "shape": [int(size) for size in node["shape"]],
                   "stored_bytes": sum(math.prod(shape) * np.dtype(pool).itemsize
                                       for pool, _, shape in node["parts"].values())}
                  for node in _encoded_nodes(document.get("graph"))]
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as error:
        raise FormatError(f"{path}: skeleton.json has a malformed array entry: {error}") from None
    return {"estimator": manifest["estimator"], "report": manifest["report"], "arrays": arrays,
            "file_bytes": Path(path).stat().st_size, "verified_checksums": True, "rebuilt": verify}


def _encoded_nodes(node: Any) -> Iterator[dict[str, Any]]:
    stack = [node]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            if value.get("$") == "encoded":
                yield value
                continue
            if value.get("$") == "table":
                yield from tables.encoded_arrays(value)
            stack.extend(reversed(list(value.values())))
        elif isinstance(value, list):
            stack.extend(reversed(value))
