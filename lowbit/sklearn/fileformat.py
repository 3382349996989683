"""The lowbit file for a scikit-learn model: one zip, no pickle.

    lowbit.json          format, version, estimator class, sha256 of every other entry, the
                         fidelity report (per-array encodings, fallbacks)
    skeleton.json        the estimator's object graph (lowbit.sklearn.skeleton): plain JSON
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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from lowbit.errors import ChecksumError, FormatError
from lowbit.sklearn import skeleton
from lowbit.sklearn.encodings import Encoded

FORMAT, VERSION = "lowbit-sklearn", 2


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _class_path(estimator: Any) -> str:
    return f"{type(estimator).__module__}.{type(estimator).__qualname__}"


def write_file(estimator: Any, encodings: dict[str, Encoded], path: str | os.PathLike,
               report: dict[str, Any], overwrite: bool = False) -> Path:
    """Save atomically; `encodings` maps slot paths to how each quantized array is stored."""
    from safetensors.numpy import save as save_arrays

    path = Path(path)
    if path.exists() and not overwrite:
        raise FormatError(f"{path} already exists; choose another path or pass overwrite=True")
    root, arrays, texts = skeleton.dump(estimator, encodings)
    entries = {"skeleton.json": json.dumps(root, separators=(",", ":")).encode(),
               "arrays.safetensors": save_arrays(arrays) if arrays else b""}
    entries.update({f"vocabulary/{index}.txt": text.encode() for index, text in enumerate(texts)})
    manifest = {"format": FORMAT, "version": VERSION, "estimator": _class_path(estimator), "report": report,
                "sha256": {name: _sha256(data) for name, data in entries.items()}}
    staging = path.with_name(f".{path.name}.partial")
    try:
        with zipfile.ZipFile(staging, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
            archive.writestr("lowbit.json", json.dumps(manifest, indent=1))
            for name, data in entries.items():
                archive.writestr(name, data)
        staging.replace(path)
    finally:
        staging.unlink(missing_ok=True)
    return path


def is_lowbit_file(path: str | os.PathLike) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return {"lowbit.json", "skeleton.json"} <= set(archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    try:
        with zipfile.ZipFile(path) as archive:
            manifest = json.loads(archive.read("lowbit.json"))
    except (OSError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as error:
        raise FormatError(f"{path} is not a lowbit scikit-learn file: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise FormatError(f"{path} is not a lowbit scikit-learn file")
    if manifest.get("version") != VERSION:
        raise FormatError(f"{path} has format version {manifest.get('version')}; this lowbit reads {VERSION}")
    return manifest


def read_file(path: str | os.PathLike) -> Any:
    """Rebuild the estimator: checksums first, then the object graph with its arrays and terms."""
    from safetensors.numpy import load as load_arrays

    manifest = read_manifest(path)
    try:
        with zipfile.ZipFile(path) as archive:
            entries = {name: archive.read(name) for name in manifest["sha256"]}
    except (KeyError, zipfile.BadZipFile, OSError) as error:
        raise FormatError(f"{path}: {error}") from None
    for name, data in entries.items():
        if _sha256(data) != manifest["sha256"][name]:
            raise ChecksumError(f"{path}: {name} does not match its sha256; the file is corrupt")
    arrays = load_arrays(entries["arrays.safetensors"]) if entries["arrays.safetensors"] else {}
    count = sum(name.startswith("vocabulary/") for name in entries)
    texts = [entries[f"vocabulary/{index}.txt"].decode() for index in range(count)]
    try:
        return skeleton.load(json.loads(entries["skeleton.json"]), arrays, texts)
    except FormatError:
        raise
    except (KeyError, ValueError, TypeError, AttributeError) as error:
        raise FormatError(f"{path}: the model cannot be rebuilt: {type(error).__name__}: {error}") from None


def describe_file(path: str | os.PathLike, verify: bool = False) -> dict[str, Any]:
    """What `lowbit inspect` shows: the estimator, the fidelity report, and per quantized array
    its encoding, shape and stored bytes. `verify` rebuilds the model (checksums first)."""
    manifest = read_manifest(path)
    if verify:
        read_file(path)
    with zipfile.ZipFile(path) as archive:
        document = json.loads(archive.read("skeleton.json"))
    arrays = [{"path": node.get("path", "?"), "encoding": node["encoding"], "shape": node["shape"],
               "stored_bytes": sum(math.prod(shape) * np.dtype(pool).itemsize
                                   for pool, _, shape in node["parts"].values())}
              for node in _encoded_nodes(document["graph"])]
    return {"estimator": manifest["estimator"], "report": manifest["report"], "arrays": arrays,
            "file_bytes": Path(path).stat().st_size, "verified_checksums": verify}


def _encoded_nodes(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        if node.get("$") == "encoded":
            yield node
            return
        for value in node.values():
            yield from _encoded_nodes(value)
    elif isinstance(node, list):
        for value in node:
            yield from _encoded_nodes(value)
