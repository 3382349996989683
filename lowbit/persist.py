"""`lowbit.save` and `lowbit.load`: any quantized model to and from the lowbit folder format."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit import hf
from lowbit.errors import FormatError, LowbitError
from lowbit.formats import read_folder, write_folder
from lowbit.nn import LayerSpec
from lowbit.quantize import RECIPE_ATTRIBUTE, quantized_modules, rebuild
from lowbit.recipe import Recipe
from lowbit.sources import build_from_factory
from lowbit.version import __version__

Skeleton = nn.Module | Callable[[], nn.Module] | str | None


def _model_description(model: nn.Module) -> dict[str, Any]:
    if hf.is_transformers_model(model):
        return hf.describe(model)
    return {"kind": "torch", "class": type(model).__name__,
            "factory": getattr(model, "lowbit_factory", None)}


def build_manifest(model: nn.Module) -> dict[str, Any]:
    """Everything but the tensors: versions, model kind, recipe and each module's spec."""
    recipe = getattr(model, RECIPE_ATTRIBUTE, None)
    modules = {
        name: {"type": type(module).__name__, "spec": module.spec.to_dict(),
               "bytes": module.weight_bytes()}
        for name, module in quantized_modules(model).items()
    }
    return {
        "versions": {"lowbit": __version__, "torch": torch.__version__},
        "model": _model_description(model),
        "source": getattr(model, "lowbit_source", None),
        "recipe": None if recipe is None else recipe.model_dump(mode="json"),
        "modules": modules,
        "comparison": getattr(model, "lowbit_comparison", None),
    }


def save(model: nn.Module, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Save a (quantized) model as a lowbit folder: atomic, checksummed, no pickle.

    A transformers model gets its config.json (with a quantization_config entry) and tokenizer
    files too, so `lowbit.load(path)` alone rebuilds it.
    """
    if not isinstance(model, nn.Module):
        raise LowbitError(f"lowbit.save expects a torch.nn.Module, got {type(model).__name__}")
    manifest = build_manifest(model)
    tensors = model.state_dict()
    # Non-persistent buffers (position ids, rotary frequencies) are saved too, so a loader can
    # build the skeleton on the meta device and take every tensor from the file.
    extra = {name: buffer for name, buffer in model.named_buffers() if name not in tensors}
    manifest["non_persistent_buffers"] = sorted(extra)
    write_extra = None
    if manifest["model"]["kind"] == "transformers":
        write_extra = hf.write_files(model, {"recipe": manifest["recipe"]})
    return write_folder(path, {**tensors, **extra}, manifest, write_extra, overwrite)


def _skeleton(manifest: dict[str, Any], folder: Path, skeleton: Skeleton) -> nn.Module:
    description = manifest.get("model", {})
    if isinstance(skeleton, nn.Module):
        return skeleton
    if isinstance(skeleton, str):
        return build_from_factory(skeleton)
    if callable(skeleton):
        return skeleton()
    if description.get("kind") == "transformers":
        return hf.build_skeleton(folder, description.get("class"), device="meta")
    if description.get("factory"):
        return build_from_factory(description["factory"])
    raise FormatError(
        f"{folder} holds a plain PyTorch module ({description.get('class')}); pass its architecture: "
        "lowbit.load(path, skeleton=model_or_factory) or --factory package.module:factory"
    )


def _set_non_persistent_buffers(model: nn.Module, tensors: dict, names: list[str]) -> None:
    """Put saved non-persistent buffers back on their modules (they are not in the state dict)."""
    for name in names:
        owner_name, _, buffer_name = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        owner.register_buffer(buffer_name, tensors.pop(name), persistent=False)


def load(path: str | os.PathLike, skeleton: Skeleton = None) -> nn.Module:
    """Load a lowbit folder. Checksums and format version are checked before anything is built.

    transformers models rebuild themselves; a plain nn.Module needs `skeleton` (a module of the
    same architecture, a callable that makes one, or "package.module:factory") unless it was
    quantized from a factory, which the manifest then names.
    """
    folder = Path(path)
    manifest, tensors = read_folder(folder)
    model = _skeleton(manifest, folder, skeleton)
    specs = {name: LayerSpec.from_dict(entry["spec"]) for name, entry in manifest["modules"].items()}
    try:
        rebuild(model, specs)
        _set_non_persistent_buffers(model, tensors, manifest.get("non_persistent_buffers", []))
        model.load_state_dict(tensors, strict=True, assign=True)
    except LowbitError:
        raise
    except (RuntimeError, KeyError, TypeError, AttributeError) as error:
        raise FormatError(f"the tensors in {folder} do not fit the model: {error}") from None
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise FormatError(f"{folder} does not hold every tensor the model needs; re-save it")
    if manifest.get("recipe"):
        setattr(model, RECIPE_ATTRIBUTE, Recipe.model_validate(manifest["recipe"]))
    model.lowbit_source = manifest.get("source")
    model.lowbit_manifest = manifest
    return model.eval()
