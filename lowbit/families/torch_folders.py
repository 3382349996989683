"""`lowbit.save` and `lowbit.load` for torch models: a quantized module to and from a lowbit folder.

What a folder records to rebuild its model comes from its torch kind (lowbit.families.registry):
a transformers model writes its config and tokenizer and rebuilds from them; a plain module is
rebuilt on a skeleton the caller passes (or, with `trust_code`, the factory the folder names).
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.errors import FormatError, LowbitError, LowbitWarning
from lowbit.families.registry import TORCH_KINDS, TorchKind, torch_kind_of
from lowbit.families.runtime_choice import RuntimeChoice, choose_runtime, plan_large_inputs
from lowbit.families.sources import build_from_factory, load_source
from lowbit.formats import MANIFEST, read_folder, write_folder
from lowbit.formats.lowbit_format import read_manifest, tensor_regions, verified_bytes
from lowbit.runtimes import RUNTIMES
from lowbit.runtimes.onnx_shared import StoredBytes, share_stored
from lowbit.runtimes.onnxruntime import ONNX_FILE, layer_ops
from lowbit.runtimes.onnxruntime import export as onnx_export
from lowbit.transform.prune import PRUNING_ATTRIBUTE
from lowbit.transform.quantize import RECIPE_ATTRIBUTE, quantized_modules
from lowbit.transform.recipe import Recipe
from lowbit.version import __version__

Skeleton = nn.Module | Callable[[], nn.Module] | str | None


def _describe_plain(model: nn.Module) -> dict[str, Any]:
    return {"kind": "torch", "class": type(model).__name__,
            "factory": getattr(model, "lowbit_factory", None)}


TORCH_KINDS.add("torch", TorchKind("torch", owns=lambda model: True, describe=_describe_plain, fallback=True))


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
        "model": torch_kind_of(model).describe(model),
        "source": getattr(model, "lowbit_source", None),
        "recipe": None if recipe is None else recipe.model_dump(mode="json"),
        "modules": modules,
        "folded": getattr(model, "lowbit_folded", {}),
        "fused": getattr(model, "lowbit_fused", {}),
        "roundings": {name: {"scale": scale, "zero_point": zero_point}
                      for name, (scale, zero_point) in getattr(model, "lowbit_roundings", {}).items()},
        "comparison": getattr(model, "lowbit_comparison", None),
        "training": getattr(model, "lowbit_training", None),
        "pruning": getattr(model, PRUNING_ATTRIBUTE, None),
        "runtime": "eager",
    }


RUNTIME_NAMES = {"torch": "eager", "eager": "eager", "onnxruntime": "onnxruntime", "auto": "auto"}


def _graph_for(model: nn.Module, runtime: str, accuracy_level: int,
               activation_block: int | None) -> RuntimeChoice:
    """The runtime as asked, its ONNX graph (or None), what `auto` measured (or an empty record)
    and, with a graph, which inputs run on int8 matrix kernels (lowbit.runtimes.onnx_large_inputs)."""
    if runtime not in RUNTIME_NAMES:
        raise LowbitError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIME_NAMES)}")
    runtime = RUNTIME_NAMES[runtime]
    if runtime == "auto":
        return choose_runtime(model, accuracy_level, activation_block=activation_block)
    if runtime != "onnxruntime":
        return RuntimeChoice(runtime, None, {})
    graph = onnx_export(model, accuracy_level=accuracy_level, activation_block=activation_block)
    return RuntimeChoice(runtime, graph, {}, plan_large_inputs(model, graph))


def save(model: nn.Module, path: str | os.PathLike, overwrite: bool = False, runtime: str = "auto",
         accuracy_level: int = 0, activation_block: int | None = None) -> Path:
    """Save a (quantized) model as a lowbit folder: atomic, checksummed, no pickle.

    A transformers model gets its config.json (with a quantization_config entry) and tokenizer
    files too, so `lowbit.load(path)` alone rebuilds it. `runtime` is what `lowbit.load` runs:
    "auto" (both timed here, the faster kept; lowbit.json records why), "eager" (or "torch"), or
    "onnxruntime" (the folder also holds model.onnx, its weights kept in the tensor file, see
    lowbit.runtimes.onnxruntime; `accuracy_level` 4 quantizes activations to int8 per block, of
    at most `activation_block` inputs when given).
    """
    if not isinstance(model, nn.Module):
        raise LowbitError(f"lowbit.save expects a torch.nn.Module, got {type(model).__name__}")
    manifest = build_manifest(model)
    kind = torch_kind_of(model)
    write_files = kind.write_files(model, {"recipe": manifest["recipe"]}) if kind.write_files else None
    choice = _graph_for(model, runtime, accuracy_level, activation_block)
    graph = choice.graph
    manifest.update(runtime=choice.runtime, runtime_choice=choice.record or None)
    if graph is not None:
        ops = layer_ops(quantized_modules(model), model)
        manifest["onnx"] = {"file": ONNX_FILE, "accuracy_level": accuracy_level, "ops": ops,
                            "activation_block": activation_block, **choice.large_inputs.entry()}

    def write_extra(staging: Path) -> None:
        if write_files is not None:
            write_files(staging)
        if graph is not None:  # its weights kept once, in the tensor file written before it
            regions = [StoredBytes(*region) for region in tensor_regions(staging)]
            shared = share_stored(graph, regions, lambda name: (staging / name).read_bytes())
            (staging / ONNX_FILE).write_bytes(shared)
    sparse = _store_sparse(model, graph is not None)
    return write_folder(path, model.state_dict(), manifest, write_extra, overwrite, sparse=sparse)


def _store_sparse(model: nn.Module, has_graph: bool) -> bool:
    """A pruned model's weights are stored as bitmask and kept values (lowbit.formats.sparse),
    except where ONNX Runtime reads them whole from the tensor file: then say so."""
    if getattr(model, PRUNING_ATTRIBUTE, None) is None:
        return False
    if has_graph:
        warnings.warn("the pruned weights are stored whole, since the onnxruntime runtime reads them "
                      "from the tensor file; save with runtime='torch' (CLI: --runtime torch) for the "
                      "smaller sparse file", LowbitWarning, stacklevel=3)
        return False
    return True


def _skeleton(manifest: dict[str, Any], folder: Path, skeleton: Skeleton, trust_code: bool) -> nn.Module:
    """The module to load tensors into: the caller's, a transformers model rebuilt from the
    folder's config.json, or (only with `trust_code`) the factory the manifest names."""
    description = manifest["model"]
    if isinstance(skeleton, nn.Module):
        return skeleton
    if isinstance(skeleton, str):
        return build_from_factory(skeleton)
    if callable(skeleton):
        return skeleton()
    kind = TORCH_KINDS.get(description["kind"])
    if kind.skeleton is not None:
        return kind.skeleton(folder, manifest)
    factory = description.get("factory")
    if factory and trust_code:
        return build_from_factory(factory)
    if factory:
        raise FormatError(
            f"{folder} names the factory {factory!r}: loading it would import and run the module "
            f"{factory.partition(':')[0]!r}. Pass trust_code=True (CLI: --trust-code) only if you trust "
            "where this folder came from, or pass the architecture yourself: "
            "lowbit.load(path, skeleton=model_or_factory)"
        )
    raise FormatError(
        f"{folder} holds a plain PyTorch module ({description['class']}); pass its architecture: "
        "lowbit.load(path, skeleton=model_or_factory)"
    )


def load(path: str | os.PathLike, skeleton: Skeleton = None, trust_code: bool = False,
         runtime: str | None = None) -> nn.Module:
    """Load a lowbit folder. The manifest's schema and every file's size and sha256 are checked
    before anything is built, and every tensor against the model before it is used.

    transformers models rebuild themselves from their checksummed config.json (no code from the
    folder runs). A plain nn.Module needs `skeleton` (a module of the same architecture, a
    callable that makes one, or "package.module:factory"); a factory the manifest names is
    imported only with `trust_code=True`, since importing it runs its code; run in ONNX Runtime, it
    needs none (the graph is the architecture). `runtime` ("torch" or "onnxruntime") overrides the
    runtime the folder records.
    """
    folder = Path(path)
    manifest, tensors = read_folder(folder)  # the recipe in it is validated there
    if runtime is not None and RUNTIME_NAMES.get(runtime) in (None, "auto"):
        raise LowbitError(f"unknown runtime {runtime!r}; load with torch or onnxruntime")
    runtime_name = RUNTIME_NAMES[runtime] if runtime else manifest["runtime"]
    chosen = RUNTIMES.get(runtime_name)  # lowbit.runtimes
    graph_only = runtime_name == "onnxruntime" and manifest["model"]["kind"] == "torch" and skeleton is None
    model = chosen(None if graph_only else _skeleton(manifest, folder, skeleton, trust_code), manifest,
                   tensors, folder, functools.partial(verified_bytes, folder, manifest))
    if manifest["recipe"] is not None:
        setattr(model, RECIPE_ATTRIBUTE, Recipe.model_validate(manifest["recipe"]))
    model.lowbit_source = manifest["source"]
    model.lowbit_training = manifest.get("training")
    setattr(model, PRUNING_ATTRIBUTE, manifest.get("pruning"))
    model.lowbit_manifest = manifest
    return model.eval()


def load_any(spec: str | Path, weights: str | Path | None = None, trust_code: bool = False,
             architecture: str | None = None, runtime: str | None = None) -> nn.Module:
    """A lowbit folder (has lowbit.json), a transformers folder, or package.module:factory.

    `architecture` is a `package.module:factory` the caller named itself (compare's original):
    a lowbit folder of a plain module is rebuilt on it, with no need to trust the folder's own.
    `runtime` runs a lowbit folder in another runtime than it records (see `load`).
    """
    path = Path(str(spec))
    if path.is_dir() and (path / MANIFEST).exists():
        plain = architecture and TORCH_KINDS.get(read_manifest(path)["model"]["kind"]).skeleton is None
        return load(path, architecture if plain else None, trust_code, runtime)
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
