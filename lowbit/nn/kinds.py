"""Which float modules lowbit can replace exactly, and as what kind (lowbit.nn.registry)."""

from __future__ import annotations

from torch import nn

from lowbit.nn.registry import qmodule_for


def module_kind(module: nn.Module) -> str | None:
    """"linear", "conv" or "embedding" (a registered kind's name) for a module lowbit replaces
    exactly, else None."""
    kind = qmodule_for(module)
    return None if kind is None else kind.name
