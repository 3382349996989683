"""The lowbit folder format: tensors in safetensors, a JSON manifest with checksums, atomic writes.

    model-w8a8/
      lowbit.json        format version, model kind, recipe, per-module specs, the sha256 and
                         size of every other file (and of every tensor), versions of lowbit
                         and torch
      model.lowbit.safetensors  quantized tensors and those left in float (sharded
                         when large); a name transformers never loads on its own
      config.json, ...   files a family writes beside the tensors (a transformers config,
                         tokenizer files), each checksummed like the tensors
      model.onnx         for the onnxruntime runtime: the graph, its weights kept in the tensor
                         file (ONNX external data; lowbit.runtimes.onnx_shared)

No pickle anywhere. `read_folder` checks the manifest's schema, that every file it names is a
regular file inside the folder, and every file's size and sha256, before any tensor reaches a
model; a file the manifest does not name is never read.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from lowbit.core.digest import tensor_sha256
from lowbit.errors import ChecksumError, FormatError
from lowbit.formats.atomic import atomic_folder
from lowbit.formats.manifest import MAX_MANIFEST_BYTES, parse_json, validate_manifest
from lowbit.formats.members import file_sha256, member, read_member, verify_member
from lowbit.formats.safetensors_layout import layout
from lowbit.formats.sparse import decode_sparse, encode_sparse, stored_names

MANIFEST = "lowbit.json"
FORMAT_VERSION = 2
DEFAULT_SHARD_BYTES = 2 * 1024**3


def deduplicate(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Store tensors that share memory (tied weights) once; return the aliases to restore them."""
    unique, aliases, seen = {}, {}, {}
    for name, tensor in tensors.items():
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()))
        if tensor.numel() and key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            unique[name] = tensor.detach().contiguous()
    return unique, aliases


TENSOR_FILE = "model.lowbit.safetensors"  # not model.safetensors: see lowbit.families.hf_quantizer


def tensor_regions(folder: Path) -> list[tuple[str, int, int]]:
    """(file, offset, length) of every tensor's bytes in the tensor files of `folder`
    (lowbit.formats.safetensors_layout)."""
    regions = []
    for file in sorted(folder.glob("model.lowbit*.safetensors")):
        start, stored = layout(file)
        regions += [(file.name, start + first, end - first) for *_, first, end in stored.values()]
    return regions


def _file_entry(path: Path) -> dict[str, Any]:
    return {"sha256": file_sha256(path), "bytes": path.stat().st_size}


def _other_files(staging: Path, listed: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every file a family wrote beside the tensors, by its path inside the folder."""
    files = {path.relative_to(staging).as_posix(): path
             for path in sorted(staging.rglob("*")) if path.is_file()}
    return {name: _file_entry(path) for name, path in files.items()
            if name != MANIFEST and name not in listed}


class ShardWriter:
    """Tensor files written as tensors arrive: each shard goes to disk once it holds
    `max_bytes`, so a model quantized module by module need not be held whole to be saved
    (lowbit.families.lazy_weights). `finish` names the shards as a folder holds them."""

    def __init__(self, staging: Path, max_bytes: int = DEFAULT_SHARD_BYTES) -> None:
        self.staging, self.max_bytes = staging, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written: list[tuple[Path, dict[str, str]]] = []  # (file, each tensor's sha256)

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """Queue `tensors` (already deduplicated), writing a shard whenever one is full."""
        for name, tensor in tensors.items():
            nbytes = tensor.numel() * tensor.element_size()
            if self.pending and self.pending_bytes + nbytes > self.max_bytes:
                self.flush()
            self.pending[name] = tensor.detach().contiguous()
            self.pending_bytes += nbytes

    def flush(self) -> None:
        """Write what is queued as one shard, and let go of it."""
        path = self.staging / f"shard-{len(self.written):05d}.partial"
        save_file(self.pending, path, metadata={"format": "pt", "writer": "lowbit"})
        self.written.append((path, {key: tensor_sha256(value) for key, value in self.pending.items()}))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> dict[str, dict[str, Any]]:
        """Write the rest and name the shards (model.lowbit.safetensors when there is one):
        the manifest's entry for each."""
        if self.pending or not self.written:
            self.flush()
        count, files = len(self.written), {}
        for index, (path, tensors) in enumerate(self.written):
            name = TENSOR_FILE if count == 1 else f"model.lowbit-{index + 1:05d}-of-{count:05d}.safetensors"
            path.rename(self.staging / name)
            files[name] = {**_file_entry(self.staging / name), "tensors": tensors}
        return files


def write_folder(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    manifest: dict[str, Any],
    write_extra: Callable[[Path], None] | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    sparse: bool = False,
) -> Path:
    """Write tensors, the family's files and the manifest into a staging folder beside `path`,
    then swap it into place (lowbit.formats.atomic): a failure at any point leaves `path` as it
    was; an existing folder is replaced only when `overwrite` is set. With `sparse`, each
    mostly-zero tensor is stored as a bitmask and its kept values where that is smaller
    (lowbit.formats.sparse)."""
    with atomic_folder(path, overwrite) as staging:
        unique, aliases = deduplicate(tensors)
        unique, sparse_record = encode_sparse(unique) if sparse else (unique, {})
        shards = ShardWriter(staging, max_shard_bytes)
        shards.add(unique)
        finish_folder(staging, shards, manifest, write_extra, aliases, sparse_record)
    return Path(path)


def finish_folder(staging: Path, shards: ShardWriter, manifest: dict[str, Any],
                  write_extra: Callable[[Path], None] | None, aliases: dict[str, str],
                  sparse_record: dict[str, Any] | None = None) -> None:
    """The last shard, the family's files and the manifest that lists every file."""
    files = shards.finish()
    if write_extra is not None:
        write_extra(staging)
    files.update(_other_files(staging, files))
    full_manifest = {"format": "lowbit", "format_version": FORMAT_VERSION, **manifest,
                     "sparse": sparse_record or {}, "files": files, "aliases": aliases}
    (staging / MANIFEST).write_text(json.dumps(full_manifest, indent=2, sort_keys=False))


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """lowbit.json, parsed and checked field by field (lowbit.formats.manifest) for a known format
    version; the files it names are not read."""
    folder = Path(path)
    if not folder.is_dir():
        raise FormatError(f"{folder} is not a folder; lowbit models are saved as folders")
    if not (folder / MANIFEST).exists():
        raise FormatError(f"{folder} has no {MANIFEST}: it is not a lowbit model folder")
    value = parse_json(read_member(folder, MANIFEST, MAX_MANIFEST_BYTES), str(folder / MANIFEST))
    if not isinstance(value, dict) or value.get("format") != "lowbit":
        raise FormatError(f"{folder / MANIFEST} is not a lowbit manifest")
    version = value.get("format_version")
    if version != FORMAT_VERSION:
        raise FormatError(
            f"{folder} uses lowbit format version {version!r}; this lowbit reads version "
            f"{FORMAT_VERSION}. Re-quantize the model with this lowbit (version 1 folders carry no "
            "checksums for their config files)."
        )
    manifest = validate_manifest(value, str(folder / MANIFEST))
    _check_tensor_names(manifest)
    _check_recipe(manifest, folder)
    return manifest


def _check_recipe(manifest: dict[str, Any], folder: Path) -> None:
    from pydantic import ValidationError

    from lowbit.transform.recipe import Recipe

    if manifest["recipe"] is None:
        return
    try:
        Recipe.model_validate(manifest["recipe"])
    except ValidationError as error:
        problem = error.errors()[0]["msg"]
        raise FormatError(f"{folder}: the recorded recipe is invalid: {problem}") from None


def _check_tensor_names(manifest: dict[str, Any]) -> None:
    """Aliases point at stored tensors, no tensor is stored twice, and each sparse tensor's mask
    and values are stored (and it is not stored whole too)."""
    stored: set[str] = set()
    for entry in manifest["files"].values():
        names = set(entry["tensors"] or ())
        if stored & names:
            raise FormatError(f"the manifest stores tensor {sorted(stored & names)[0]!r} twice")
        stored |= names
    for name in manifest["sparse"]:
        parts = set(stored_names(name))
        if not parts <= stored or name in stored:
            raise FormatError(f"the manifest's sparse tensor {name!r} is not stored as a mask and values")
        stored = (stored - parts) | {name}
    for alias, canonical in manifest["aliases"].items():
        if canonical not in stored or alias in stored:
            raise FormatError(f"the manifest's alias {alias!r} -> {canonical!r} does not name one "
                              "stored tensor")


def tensor_files(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: entry for name, entry in manifest["files"].items() if entry["tensors"] is not None}


def check_folder(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest, after a quick check of every file it names: a regular file inside the folder,
    of the recorded size, and for tensor files a safetensors header listing exactly the recorded
    tensors. No checksum is computed (see `read_folder`)."""
    folder = Path(path)
    manifest = read_manifest(folder)
    headers: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, entry in manifest["files"].items():
        file = member(folder, name)
        if file.stat().st_size != entry["bytes"]:
            raise FormatError(f"{file} is {file.stat().st_size:,} bytes; {entry['bytes']:,} were recorded "
                              "when it was saved: the file is truncated or was changed")
        if entry["tensors"] is not None:
            header = _header(file)
            if set(header) != set(entry["tensors"]):
                raise FormatError(f"{file} does not hold the tensors the manifest lists")
            headers.update(header)
    for name, entry in manifest["sparse"].items():
        headers[name] = (entry["dtype"], tuple(entry["shape"]))
    for alias, canonical in manifest["aliases"].items():
        headers[alias] = headers[canonical]
    _check_module_weights(manifest, headers, folder)
    return manifest


def _header(file: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Each tensor's dtype and shape, from a safetensors header alone."""
    try:
        with safe_open(file, framework="pt") as handle:
            return {key: (handle.get_slice(key).get_dtype(), tuple(handle.get_slice(key).get_shape()))
                    for key in handle.keys()}  # noqa: SIM118 - a safetensors handle, not a dict
    except (SafetensorError, OSError, ValueError) as error:
        raise FormatError(f"{file} is not a readable safetensors file: {error}") from None


STORED_WEIGHT = {"int8": "I8", "int5": "U8", "int4": "U8", "fp16": "F16", "bf16": "BF16"}


def _check_module_weights(manifest: dict[str, Any], headers: dict, folder: Path) -> None:
    """Each module's spec fits its kind and the dtype and shape of the weight stored for it."""
    from lowbit.nn import LayerSpec
    from lowbit.nn.registry import QMODULES

    for name, entry in manifest["modules"].items():
        spec = LayerSpec.from_dict(entry["spec"])
        dtype, shape = headers.get(f"{name}.weight", (None, ()))
        if dtype != STORED_WEIGHT[spec.weight] or len(shape) != (4 if entry["type"] == "QConv2d" else 2):
            raise FormatError(f"{folder}: module {name!r}: its stored weight ({dtype} {list(shape)}) is "
                              f"not a {spec.weight} {entry['type']} weight")
        unpacked = (*shape[:-1], shape[-1] * 2) if spec.weight == "int4" else shape
        kind = next(kind.name for kind in QMODULES.values() if kind.quantized.__name__ == entry["type"])
        problem = spec.problem(kind, unpacked)
        if problem:
            raise FormatError(f"{folder}: module {name!r}: {problem}")


def verified_file(folder: Path, manifest: dict[str, Any], name: str) -> Path:
    """The path of a file the manifest lists, after its size and sha256 are checked."""
    entry = manifest["files"].get(name)
    if entry is None:
        raise FormatError(f"{folder} has no checksummed {name}; re-save the model")
    return verify_member(folder, name, entry["sha256"], entry["bytes"])


def verified_bytes(folder: Path, manifest: dict[str, Any], name: str) -> bytes:
    """A file the manifest lists, read once and checked against its recorded size and sha256:
    the bytes a runtime uses are the bytes that were checked (a file swapped after
    `verify_files` is caught)."""
    entry = manifest["files"].get(name)
    if entry is None:
        raise FormatError(f"{folder} has no checksummed {name}; re-save the model")
    data = member(folder, name).read_bytes()
    if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ChecksumError(f"{folder / name} does not match the size and sha256 recorded when it was saved: "
                            "the file is corrupt or was changed. Re-save or re-download the model.")
    return data


def verify_files(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest, after every file it names matches its recorded size and sha256."""
    folder = Path(path)
    manifest = read_manifest(folder)
    for name in manifest["files"]:
        verified_file(folder, manifest, name)
    return manifest


def read_folder(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Manifest and tensors of a lowbit folder, after checking every file's size and sha256 and
    that each tensor file holds exactly the tensors the manifest lists."""
    folder = Path(path)
    manifest = verify_files(folder)
    return manifest, read_tensors(folder, manifest)


def read_tensors(folder: Path, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every tensor of a folder whose files `verify_files` has checked (aliases included), each
    tensor file holding exactly the tensors the manifest lists."""
    tensors: dict[str, torch.Tensor] = {}
    for name, entry in tensor_files(manifest).items():
        file = folder / name
        try:
            loaded = load_file(file)
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            raise FormatError(f"{file} is not a readable safetensors file: {error}") from None
        if set(loaded) != set(entry["tensors"]):
            raise FormatError(f"{file} does not hold the tensors the manifest lists")
        tensors.update(loaded)
    for name, entry in manifest["sparse"].items():
        mask, values = (tensors.pop(part) for part in stored_names(name))
        tensors[name] = decode_sparse(name, mask, values, entry)
    for alias, canonical in manifest["aliases"].items():
        tensors[alias] = tensors[canonical]
    return tensors
