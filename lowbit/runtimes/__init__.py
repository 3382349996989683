"""Runtimes: what runs a quantized model. A runtime turns a lowbit folder's recorded modules and
tensors into something callable, on a skeleton of the model's architecture; each registers
itself here by the name a folder records (`eager` today; ONNX Runtime next).

A runtime is `(skeleton, modules, tensors, where) -> model`: `modules` is the manifest's
per-module record (type and LayerSpec), `tensors` every saved tensor, `where` names the folder
in errors. It checks what it is given before the model can be called.
"""

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lowbit.registry import Registry

Runtime = Callable[[nn.Module, dict[str, Any], dict[str, torch.Tensor], str], nn.Module]
RUNTIMES: Registry[Runtime] = Registry("runtime")

from lowbit.runtimes import eager  # noqa: E402,F401 - registers itself
