"""Size: bytes on disk of a file or folder, and bytes a model holds in memory."""

from __future__ import annotations

from pathlib import Path

from torch import nn


def folder_bytes(path: str | Path) -> int:
    """Bytes of every file under `path` (a file's own size when `path` is a file)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer the model holds in memory, counted once each; for a
    model run outside PyTorch (the onnxruntime runtime), the bytes of the graph it runs."""
    outside = getattr(model, "model_bytes", None)
    if outside is not None:
        return int(outside)
    seen, total = set(), 0
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total
