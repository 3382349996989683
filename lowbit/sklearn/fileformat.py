"""The lowbit file for a scikit-learn model: one zip, no pickle.

    lowbit.json          format, version, estimator class, per-array encoding, sha256 of every
                         entry, the fidelity report
    model.skops          the estimator's structure (skops, no pickle), its large float arrays
                         and vocabularies left out
    arrays.safetensors   the encoded arrays (int8/int16 rows with scales, float32, exact)
    vocabulary/N.txt     a text vectorizer's terms in column order, one per line

Written to a temporary file and renamed into place; every entry is checked against its sha256
before anything is built, and skops loads only scikit-learn and numpy types.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from lowbit.errors import ChecksumError, FormatError
from lowbit.sklearn.encodings import Encoded, decode
from lowbit.sklearn.slots import find_slots, find_vocabularies

FORMAT, VERSION = "lowbit-sklearn", 1
TRUSTED_PREFIXES = ("sklearn.", "numpy.", "scipy.sparse.", "builtins.", "collections.")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _placeholder_skeleton(
    estimator: Any, encodings: dict[str, Encoded],
) -> tuple[bytes, dict[str, list[str]], set[str]]:
    """The skops bytes of `estimator` with encoded arrays and vocabularies emptied (restored
    after), the vocabularies' terms, and the paths of the arrays left out."""
    import skops.io

    slots = {slot.path: slot for slot in find_slots(estimator) if slot.standalone and slot.path in encodings}
    vocabularies = dict(find_vocabularies(estimator))
    kept = {path: slot.get() for path, slot in slots.items()}
    terms = {path: [term for term, _ in sorted(owner.vocabulary_.items(), key=lambda item: item[1])]
             for path, owner in vocabularies.items()}
    saved_vocabularies = {path: owner.vocabulary_ for path, owner in vocabularies.items()}
    try:
        for path, slot in slots.items():
            slot.set(np.empty(0, dtype=kept[path].dtype))
        for owner in vocabularies.values():
            owner.vocabulary_ = {}
        return skops.io.dumps(estimator), terms, set(slots)
    finally:
        for path, slot in slots.items():
            slot.set(kept[path])
        for path, owner in vocabularies.items():
            owner.vocabulary_ = saved_vocabularies[path]


def write_file(estimator: Any, encodings: dict[str, Encoded], path: str | os.PathLike,
               report: dict[str, Any], overwrite: bool = False) -> Path:
    """Save atomically; `encodings` maps slot paths to how each array is stored."""
    from safetensors.numpy import save as save_arrays

    path = Path(path)
    if path.exists() and not overwrite:
        raise FormatError(f"{path} already exists; choose another path or pass overwrite=True")
    skeleton, terms, stored = _placeholder_skeleton(estimator, encodings)
    tensors, arrays = {}, {}
    for index, (slot_path, encoded) in enumerate(sorted(encodings.items())):
        if slot_path not in stored:
            continue  # kept inside the skeleton (tree node fields), already holding decoded values
        keys = {name: f"{index}.{name}" for name in encoded.parts}
        tensors.update({keys[name]: np.ascontiguousarray(part) for name, part in encoded.parts.items()})
        arrays[slot_path] = {"encoding": encoded.encoding, "dtype": encoded.dtype,
                             "shape": list(encoded.shape), "parts": keys}
    entries = {"model.skops": skeleton, "arrays.safetensors": save_arrays(tensors) if tensors else b""}
    vocabularies = {}
    for index, (vocab_path, words) in enumerate(sorted(terms.items())):
        if any("\n" in word for word in words):
            raise FormatError(f"a term of {vocab_path} holds a newline; this vocabulary cannot be stored")
        entries[f"vocabulary/{index}.txt"] = "\n".join(words).encode()
        vocabularies[vocab_path] = f"vocabulary/{index}.txt"
    manifest = {"format": FORMAT, "version": VERSION, "estimator": _class_path(estimator), "arrays": arrays,
                "vocabularies": vocabularies, "report": report,
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


def _class_path(estimator: Any) -> str:
    return f"{type(estimator).__module__}.{type(estimator).__qualname__}"


def is_lowbit_file(path: str | os.PathLike) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return "lowbit.json" in archive.namelist() and "model.skops" in archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    try:
        with zipfile.ZipFile(path) as archive:
            manifest = json.loads(archive.read("lowbit.json"))
    except (OSError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as error:
        raise FormatError(f"{path} is not a lowbit scikit-learn file: {error}") from None
    if manifest.get("format") != FORMAT:
        raise FormatError(f"{path} is not a lowbit scikit-learn file")
    if manifest.get("version", 0) > VERSION:
        raise FormatError(f"{path} has format version {manifest['version']}; this lowbit reads {VERSION}")
    return manifest


def load_skops_safely(data: bytes) -> Any:
    """skops.io.load trusting only scikit-learn, numpy and builtin types."""
    import skops.io

    untrusted = skops.io.get_untrusted_types(data=data)
    foreign = [name for name in untrusted if not name.startswith(TRUSTED_PREFIXES)]
    if foreign:
        raise FormatError(f"the model holds types outside scikit-learn and numpy: {', '.join(foreign[:5])}")
    return skops.io.loads(data, trusted=untrusted)


def read_file(path: str | os.PathLike) -> Any:
    """Rebuild the estimator: checksums first, then structure, then decoded arrays and terms."""
    from safetensors.numpy import load as load_arrays

    manifest = read_manifest(path)
    with zipfile.ZipFile(path) as archive:
        entries = {name: archive.read(name) for name in manifest["sha256"]}
    for name, data in entries.items():
        if _sha256(data) != manifest["sha256"][name]:
            raise ChecksumError(f"{path}: {name} does not match its sha256; the file is corrupt")
    estimator = load_skops_safely(entries["model.skops"])
    tensors = load_arrays(entries["arrays.safetensors"]) if entries["arrays.safetensors"] else {}
    slots = {slot.path: slot for slot in find_slots(estimator, min_elements=0)}
    for slot_path, entry in manifest["arrays"].items():
        if slot_path not in slots:
            raise FormatError(f"{path}: the model has no array at {slot_path}")
        parts = {name: tensors[key] for name, key in entry["parts"].items()}
        slots[slot_path].set(decode(Encoded(entry["encoding"], parts, entry["dtype"], tuple(entry["shape"]))))
    owners = dict(find_vocabularies(estimator))
    for vocab_path, entry in manifest["vocabularies"].items():
        words = entries[entry].decode().split("\n") if entries[entry] else []
        owners[vocab_path].vocabulary_ = {word: index for index, word in enumerate(words)}
    return estimator
