"""The model families and the torch model kinds, each registered by its own module.

A family is where models come from and how they are loaded and measured: `torch` (PyTorch and
transformers modules, saved as lowbit folders) and `scikit-learn` (estimators, saved as one
.lowbit file). A torch kind is what a torch folder records to rebuild its model: `transformers`
(from its config.json) or a plain `torch` module (from a skeleton the caller passes).
Adding one adds a file that registers itself; nothing else branches on the family.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from lowbit.errors import LowbitError
from lowbit.registry import Registry


@dataclass(frozen=True)
class Family:
    """How one family's models are recognised, loaded and measured."""

    name: str
    claims: Callable[[Any], bool]        # a model object, a saved file or folder, or a source spec
    load: Callable[..., Any]             # a saved lowbit model: load(path, **options)
    compare: Callable[..., Any]          # compare(original, quantized, data, **options) -> Comparison
    bench: Callable[..., dict[str, Any]]  # bench(model, **options)
    open_original: Callable[..., Any]     # open_original(model or path, trust_pickle=, trust_code=)
    smoke_input: Callable[[Any, Any], Any]  # smoke_input(loaded model, its path): one batch, or None
    smoke_run: Callable[[Any, Any], bool]   # smoke_run(model, batch): whether its outputs are finite
    fallback: bool = False               # asked last: it claims whatever no other family does


@dataclass(frozen=True)
class TorchKind:
    """What a torch folder records to rebuild its model, and the files it writes beside it."""

    name: str
    owns: Callable[[nn.Module], bool]
    describe: Callable[[nn.Module], dict[str, Any]]
    write_files: Callable[[nn.Module, dict[str, Any]], Callable[[Path], None]] | None = None
    skeleton: Callable[[Path, dict[str, Any]], nn.Module] | None = None
    fallback: bool = False  # asked last: it owns whatever no other kind does


FAMILIES: Registry[Family] = Registry("model family")
TORCH_KINDS: Registry[TorchKind] = Registry("torch model kind")


def _fallback_last(entries: list) -> list:
    return sorted(entries, key=lambda entry: entry.fallback)  # stable: registration order otherwise


def family_of(*sources: Any) -> Family:
    """The family that claims any of `sources`: specific families first, the fallback (torch:
    anything else) last."""
    for family in _fallback_last(FAMILIES.values()):
        if any(family.claims(source) for source in sources):
            return family
    raise LowbitError(f"no model family handles {str(sources[0])[:80]!r}")


def torch_kind_of(model: nn.Module) -> TorchKind:
    """The kind that owns `model` (the plain `torch` kind, the fallback, owns every module)."""
    return next(kind for kind in _fallback_last(TORCH_KINDS.values()) if kind.owns(model))
