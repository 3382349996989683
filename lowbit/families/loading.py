"""Open any model lowbit can measure: a lowbit folder, a transformers folder or a factory spec."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from lowbit.families.sources import load_source
from lowbit.formats import MANIFEST
from lowbit.formats.lowbit_format import read_manifest
from lowbit.formats.persist import Skeleton
from lowbit.formats.persist import load as load_folder


def load(path: str | os.PathLike, skeleton: Skeleton = None, trust_code: bool = False) -> Any:
    """A saved lowbit model: a folder (a torch module, see lowbit.formats.persist.load) or a single
    scikit-learn file (the estimator, rebuilt without pickle). `trust_code` lets a folder's
    manifest name a `module:factory` to import; nothing else a file names is ever imported."""
    from lowbit.families.sklearn.fileformat import read_file

    if Path(path).is_file():  # torch models are folders; a single file is a scikit-learn model
        return read_file(path)
    return load_folder(path, skeleton, trust_code)


def load_any(spec: str | Path, weights: str | Path | None = None, trust_code: bool = False,
             architecture: str | None = None) -> nn.Module:
    """A lowbit folder (has lowbit.json), a transformers folder, or package.module:factory.

    `architecture` is a `package.module:factory` the caller named itself (compare's original):
    a lowbit folder of a plain module is rebuilt on it, with no need to trust the folder's own.
    """
    path = Path(str(spec))
    if path.is_dir() and (path / MANIFEST).exists():
        plain = architecture and read_manifest(path)["model"]["kind"] == "torch"
        return load_folder(path, architecture if plain else None, trust_code)
    return load_source(spec, weights)


def weights_bytes(spec: str | Path) -> int | None:
    """Bytes on disk of a model folder's weight files (safetensors/bin), or of a lowbit folder."""
    path = Path(str(spec))
    if not path.is_dir():
        return None
    if (path / MANIFEST).is_file():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    files = [f for f in path.iterdir() if f.suffix in (".safetensors", ".bin", ".gguf")]
    return sum(f.stat().st_size for f in files) or None
