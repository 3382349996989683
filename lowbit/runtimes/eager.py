"""The PyTorch eager runtime: quantized modules swapped into the skeleton, saved tensors loaded
into them, every value a kernel indexes with checked first. Each quantized module runs the
kernel recorded for it (lowbit.nn.kernels)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.errors import FormatError, MissingKernelWarning, QuantizationError
from lowbit.nn import LayerSpec
from lowbit.nn.registry import qmodule_for
from lowbit.nn.rounding import attach_roundings
from lowbit.runtimes import RUNTIMES
from lowbit.transform.fold import folded_structure
from lowbit.transform.quantize import quantized_modules, rebuild


def swap_in(model: nn.Module, modules: dict[str, Any], where: str) -> None:
    """Swap the skeleton's float modules for empty quantized ones, after checking that each
    recorded spec fits the module it replaces."""
    found = dict(model.named_modules())
    specs = {}
    for name, entry in modules.items():
        module = found.get(name)
        kind = qmodule_for(module) if module is not None else None
        if kind is None or kind.quantized.__name__ != entry["type"]:
            raise FormatError(f"{where}: module {name!r} is recorded as a {entry['type']}, but the model "
                              "has no such layer there; is this the architecture that was quantized?")
        spec = LayerSpec.from_dict(entry["spec"])
        problem = spec.problem(kind.name, tuple(module.weight.shape))
        if problem:
            raise FormatError(f"{where}: module {name!r}: {problem}")
        specs[name] = spec
    try:
        rebuild(model, specs)
    except QuantizationError as error:
        raise FormatError(f"{where}: {error}") from None


def fold_skeleton(model: nn.Module, folded: dict[str, str], where: str) -> None:
    """Shape the skeleton like the model that was saved: the batch norms quantizing folded into
    convolutions become identities, and those convolutions get a bias."""
    modules = dict(model.named_modules())
    for norm, conv in folded.items():
        if not isinstance(modules.get(norm), nn.BatchNorm2d) or not isinstance(modules.get(conv), nn.Conv2d):
            raise FormatError(f"{where} records the batch norm {norm!r} folded into the convolution "
                              f"{conv!r}, but the model has no such pair; is this the architecture that "
                              "was quantized?")
    folded_structure(model, folded)


def round_outputs(model: nn.Module, roundings: dict[str, dict[str, Any]], where: str) -> None:
    """The rounding points the manifest records (lowbit.nn.rounding), on modules the model has."""
    modules = dict(model.named_modules())
    unknown = sorted(name for name in roundings if name not in modules or not name)
    if unknown:
        raise FormatError(f"{where} rounds the output of {unknown[0]!r}, which the model does not have; is "
                          "this the architecture that was quantized?")
    grids = {name: (entry["scale"], entry["zero_point"]) for name, entry in roundings.items()}
    attach_roundings(model, grids)


def _check_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Every tensor the model needs is given, with the skeleton's shape and dtype."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise FormatError(f"{where}: the tensors do not fit the model (missing: {missing[:3]}, "
                          f"unexpected: {unexpected[:3]})")
    for name, tensor in tensors.items():
        want = expected[name]
        if tensor.shape != want.shape or tensor.dtype != want.dtype:
            raise FormatError(f"{where}: tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}; the model "
                              f"needs {want.dtype} {tuple(want.shape)}")


def check_loaded(model: nn.Module, where: str) -> None:
    """Every tensor is loaded, each quantized module's values fit its kernels, and kernels this
    machine lacks become the reference (with a warning) instead of failing at the first call."""
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise FormatError(f"{where} does not hold every tensor the model needs; re-save it")
    for name, module in quantized_modules(model).items():
        problem = module.loaded_problem()
        if problem:
            raise FormatError(f"{where}: module {name!r}: {problem}")
        swapped = module.use_available_kernels()
        if swapped:
            warnings.warn(f"{name}: this machine cannot run {', '.join(swapped)} (missing from this PyTorch "
                          "build, or 8-bit activations without VNNI); running the (slow, exact) "
                          "reference kernel instead", MissingKernelWarning, stacklevel=3)


def materialize(skeleton: nn.Module, manifest: dict[str, Any], tensors: dict[str, torch.Tensor],
                folder: Path, _: Callable[[str], bytes]) -> nn.Module:
    """The skeleton with its quantized modules in place and every tensor loaded and checked."""
    where = str(folder)
    fold_skeleton(skeleton, manifest["folded"], where)
    swap_in(skeleton, manifest["modules"], where)
    _check_tensors(skeleton, tensors, where)
    skeleton.load_state_dict(tensors, strict=True, assign=True)
    check_loaded(skeleton, where)
    round_outputs(skeleton, manifest["roundings"], where)
    return skeleton.eval()


RUNTIMES.add("eager", materialize)
