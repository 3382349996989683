"""Which float modules lowbit can replace exactly, and as what kind (lowbit.nn.registry); and how
one module of a model is replaced by name."""

from __future__ import annotations

from torch import nn

from lowbit.nn.registry import qmodule_for


def module_kind(module: nn.Module) -> str | None:
    """"linear", "conv" or "embedding" (a registered kind's name) for a module lowbit replaces
    exactly, else None."""
    kind = qmodule_for(module)
    return None if kind is None else kind.name


def set_module(model: nn.Module, name: str, replacement: nn.Module) -> None:
    """Put `replacement` where `model` holds the module named `name` (a dotted path)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, replacement)
