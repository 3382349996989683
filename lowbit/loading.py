"""Open any model lowbit can measure: a lowbit folder, a transformers folder or a factory spec."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from lowbit.formats import MANIFEST
from lowbit.persist import load
from lowbit.sources import load_source


def load_any(spec: str | Path, weights: str | Path | None = None) -> nn.Module:
    """A lowbit folder (has lowbit.json), a transformers folder, or package.module:factory."""
    path = Path(str(spec))
    if path.is_dir() and (path / MANIFEST).is_file():
        return load(path)
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
