"""The registry from a float module class to the quantized module that replaces it (as
optimum-quanto's `register_qmodule`): a new kind of module adds a file that registers itself,
and the model walk, the loader and the file checks find it here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowbit.nn.spec import LayerSpec
from lowbit.registry import Registry


@dataclass(frozen=True)
class QModuleKind:
    """One kind of module lowbit quantizes ("linear", "conv", "embedding")."""

    name: str
    quantized: type[nn.Module]  # QLinear, QConv2d, ...
    replaces: Callable[[nn.Module], bool]  # the float modules it reproduces exactly
    build: Callable[[nn.Module, LayerSpec, dict[str, Any]], nn.Module]  # quantize one (calibrated ranges)
    empty: Callable[[nn.Module, LayerSpec], nn.Module]  # one shaped like it, to load tensors into
    # the rows (groups, n, columns) whose products X Xᵀ make the Hessian a GPTQ-class algorithm
    # rounds its weight against, from one input; None: the kind has no such inputs (a table)
    input_rows: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None
    # what, beside the input tensor itself, its rows depend on: modules reading one tensor with
    # the same key share one product (query, key and value)
    rows_key: Callable[[nn.Module], tuple] = lambda module: ()


QMODULES: Registry[QModuleKind] = Registry("quantized module kind")


def register_qmodule(kind: QModuleKind) -> None:
    QMODULES.add(kind.name, kind)


def qmodule_for(module: nn.Module) -> QModuleKind | None:
    """The kind that replaces `module`, or None when lowbit keeps it in float."""
    return next((kind for kind in QMODULES.values() if kind.replaces(module)), None)


def quantized_classes() -> tuple[type[nn.Module], ...]:
    return tuple(kind.quantized for kind in QMODULES.values())
