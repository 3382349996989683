"""Runtimes: what runs a quantized model. A runtime turns a lowbit folder into something
callable; each registers itself here by the name a folder records: `eager` (PyTorch, on a
skeleton of the model's architecture) and `onnxruntime` (the folder's model.onnx).

A runtime is `(skeleton, manifest, tensors, folder, read) -> model`: `manifest` is the folder's
checked lowbit.json (its per-module records, and what the runtime wrote there), `tensors` every
saved tensor, `read(name)` the bytes of a file the manifest lists, checked against its sha256
(lowbit.formats reads them: this layer comes before it). It checks what it is given before the
model can be called.
"""

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.registry import Registry

Runtime = Callable[[nn.Module, dict[str, Any], dict[str, torch.Tensor], Path, Callable[[str], bytes]],
                   nn.Module]
RUNTIMES: Registry[Runtime] = Registry("runtime")

from lowbit.runtimes import eager, onnxruntime  # noqa: E402,F401 - each registers itself
