"""The lowbit folder format: tensors in safetensors, a JSON manifest with checksums, atomic writes.

    model-w8a8/
      lowbit.json        format version, model kind, recipe, per-module specs, sha256 of every
                         tensor and every tensor file, versions of lowbit and torch
      model.safetensors  quantized tensors and those left in float (sharded when large)

No pickle anywhere. `read_folder` checks the format version and every file's sha256 before any
tensor reaches a model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lowbit.core.digest import tensor_sha256
from lowbit.errors import ChecksumError, FormatError

MANIFEST = "lowbit.json"
FORMAT_VERSION = 1
DEFAULT_SHARD_BYTES = 2 * 1024**3


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards, current, size = [], {}, 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += nbytes
    return [*shards, current]


def _shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def write_folder(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    manifest: dict[str, Any],
    write_extra: Callable[[Path], None] | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write tensors and manifest into a temporary folder beside `path`, then rename it into place.

    A failure at any point leaves no partial folder; an existing folder is replaced only when
    `overwrite` is set, and only after the new one is complete.
    """
    target = Path(path)
    if target.exists() and not overwrite:
        raise FormatError(f"{target} already exists; choose another path or pass overwrite=True")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        unique, aliases = deduplicate(tensors)
        files = {}
        shards = _shards(unique, max_shard_bytes)
        for name, shard in zip(_shard_names(len(shards)), shards, strict=True):
            save_file(shard, staging / name, metadata={"format": "pt", "writer": "lowbit"})
            files[name] = {
                "sha256": file_sha256(staging / name),
                "tensors": {key: tensor_sha256(value) for key, value in shard.items()},
            }
        if write_extra is not None:
            write_extra(staging)
        full_manifest = {"format": "lowbit", "format_version": FORMAT_VERSION, **manifest,
                         "files": files, "aliases": aliases}
        (staging / MANIFEST).write_text(json.dumps(full_manifest, indent=2, sort_keys=False))
        _move_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _move_into_place(staging: Path, target: Path) -> None:
    if not target.exists():
        os.replace(staging, target)
        return
    backup = target.with_name(f".{target.name}.old")
    shutil.rmtree(backup, ignore_errors=True)
    os.replace(target, backup)
    os.replace(staging, target)
    shutil.rmtree(backup, ignore_errors=True)


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """Parse and check lowbit.json: present, valid JSON, a lowbit folder of a known version."""
    folder = Path(path)
    if not folder.is_dir():
        raise FormatError(f"{folder} is not a folder; lowbit models are saved as folders")
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise FormatError(f"{folder} has no {MANIFEST}: it is not a lowbit model folder")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise FormatError(f"{manifest_path} is corrupt: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "lowbit":
        raise FormatError(f"{manifest_path} is not a lowbit manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise FormatError(
            f"{folder} uses lowbit format version {version}; this lowbit reads version "
            f"{FORMAT_VERSION}. Upgrade lowbit or re-quantize the model."
        )
    return manifest


def read_folder(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Manifest and tensors of a lowbit folder, after checking every file's sha256."""
    folder = Path(path)
    manifest = read_manifest(folder)
    tensors: dict[str, torch.Tensor] = {}
    for name, entry in manifest.get("files", {}).items():
        file = folder / name
        if not file.is_file():
            raise FormatError(f"{file} is missing; the folder is incomplete")
        if file_sha256(file) != entry.get("sha256"):
            raise ChecksumError(
                f"{file} does not match the sha256 recorded when it was saved: the file is "
                "corrupt or was changed. Re-save or re-download the model."
            )
        try:
            tensors.update(load_file(file))
        except (SafetensorError, OSError, ValueError) as error:
            raise FormatError(f"{file} is not a readable safetensors file: {error}") from None
    for alias, canonical in manifest.get("aliases", {}).items():
        tensors[alias] = tensors[canonical]
    return manifest, tensors
