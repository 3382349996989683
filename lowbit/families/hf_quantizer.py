"""lowbit in transformers' quantizer registry: `AutoModel.from_pretrained(folder)` on a lowbit
folder returns the quantized model lowbit.load would, once lowbit is imported.

A lowbit folder's config.json carries `quantization_config: {"quant_method": "lowbit", ...}` and
names its weights with `transformers_weights` as a file that does not exist (its name says to
install and import lowbit). The tensors live in `model.lowbit.safetensors`, a name transformers
never looks for on its own. So without lowbit, transformers refuses (no such file) instead of
reading int8 codes as float weights; with lowbit, this quantizer points transformers at the real
file, checks every file's sha256 and swaps lowbit's quantized modules in before the weights
load, and afterwards checks that every tensor equals the file's before the model is handed over.

The classes are made when transformers' quantizer registry is imported (lowbit.families
.after_import), so `import lowbit` stays free of transformers.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from lowbit.errors import FormatError
from lowbit.families.after_import import after_import
from lowbit.formats.lowbit_format import TENSOR_FILE, read_tensors, verify_files
from lowbit.runtimes.eager import check_loaded, swap_in

METHOD = "lowbit"
MISSING_WEIGHTS = "install-and-import-lowbit-to-load-this-model.safetensors"
HOW_TO_LOAD = ("pip install lowbit, then `import lowbit` before from_pretrained "
               "(or load the folder with lowbit.load)")


def config_entries(recipe: dict[str, Any] | None, weights: str | None) -> dict[str, Any]:
    """What a lowbit folder's config.json adds for transformers (see the module docstring)."""
    return {"transformers_weights": MISSING_WEIGHTS,
            "quantization_config": {"quant_method": METHOD, "weights": weights, "recipe": recipe,
                                    "how_to_load": HOW_TO_LOAD}}


def _name_map(saved: list[str], model: nn.Module) -> dict[str, str]:
    """Saved module name -> the name in `model`: the same, or with the base model's prefix added
    or dropped, as transformers maps the weights themselves (a base model's folder loaded with a
    head class, or a head model's folder with AutoModel, which leaves its head out)."""
    if not saved:
        return {}
    names = {name for name, _ in model.named_modules()}
    prefix = getattr(model, "base_model_prefix", "") + "."
    inside = [name for name in saved if name.startswith(prefix)]
    candidates = [{name: name for name in saved}, {name: prefix + name for name in saved},
                  {name: name.removeprefix(prefix) for name in inside} if inside else {}]
    for candidate in candidates:
        if candidate and all(target in names for target in candidate.values()):
            return candidate
    missing = next(name for name in saved if name not in names)
    raise FormatError(f"the lowbit folder quantized a module {missing!r} that {type(model).__name__} "
                      "does not have; load it with the model class it was saved from")


def _renamed_key(key: str, names: dict[str, str]) -> str:
    module, _, leaf = key.rpartition(".")
    return f"{names[module]}.{leaf}" if module in names else key


def _tie(model: nn.Module, aliases: dict[str, str]) -> None:
    """Point each alias at its canonical tensor, as lowbit.load does."""
    for alias, canonical in aliases.items():
        module_name, _, leaf = alias.rpartition(".")
        try:
            module = model.get_submodule(module_name)
            tensor = model.get_parameter(canonical) if canonical in dict(model.named_parameters()) else \
                model.get_buffer(canonical)
        except AttributeError:
            raise FormatError(f"the lowbit folder ties {alias} to {canonical}, which "
                              f"{type(model).__name__} does not have") from None
        if leaf in module._parameters:
            module._parameters[leaf] = tensor
        else:
            module._buffers[leaf] = tensor


def _untie_quantized(model: nn.Module, quantized: set[str]) -> None:
    """Drop transformers' own ties that touch a quantized module (lowbit's aliases tie those,
    codes, scales and zero points together); ties between float tensors stay transformers'."""
    ties = getattr(model, "all_tied_weights_keys", None) or {}
    model.all_tied_weights_keys = {
        target: source for target, source in ties.items()
        if target.rpartition(".")[0] not in quantized and source.rpartition(".")[0] not in quantized}


def _check_same(model: nn.Module, expected: dict[str, torch.Tensor], where: str) -> None:
    """Every tensor transformers loaded equals the checksummed file's: a tensor the file holds and
    the model has must match exactly. (A tensor only the file holds is a head the class leaves
    out; one only the model holds is a new head transformers reports itself.)"""
    for key, tensor in model.state_dict().items():
        stored = expected.get(key)
        if stored is not None and (stored.dtype != tensor.dtype or stored.shape != tensor.shape
                                   or not torch.equal(stored, tensor)):
            raise FormatError(f"{where}: transformers loaded {key} differently from the file; "
                              "load the folder with lowbit.load instead")


def _make_classes(auto: ModuleType) -> None:
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    class LowbitConfig(QuantizationConfigMixin):
        """The `quantization_config` of a lowbit folder's config.json."""

        def __init__(self, weights: str | None = None, recipe: dict[str, Any] | None = None,
                     how_to_load: str = HOW_TO_LOAD, **kwargs: Any) -> None:
            self.quant_method = METHOD
            self.weights, self.recipe, self.how_to_load = weights, recipe, how_to_load

    class LowbitHfQuantizer(HfQuantizer):
        """Loads a lowbit folder through from_pretrained; quantizing on the fly is refused
        (`requires_calibration`): quantize with lowbit and load the folder it writes."""

        requires_calibration = True

        def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
            return torch.float32  # lowbit's kernels take and keep float32 activations

        def update_attn_implementation(self, config: Any) -> Any:
            config = super().update_attn_implementation(config)
            if self.quantization_config.weights != TENSOR_FILE:  # never a name the config chose
                raise FormatError(f"a lowbit folder loads through transformers from {TENSOR_FILE} "
                                  "alone (a sharded folder loads with lowbit.load(path))")
            config.transformers_weights = TENSOR_FILE  # the real tensor file
            return config

        def _process_model_before_weight_loading(self, model: nn.Module, checkpoint_files=None,
                                                 **kwargs: Any) -> None:
            files = [Path(file) for file in checkpoint_files or ()]
            if len(files) != 1 or files[0].name != TENSOR_FILE:
                raise FormatError(f"a lowbit folder loads through transformers from its {TENSOR_FILE} "
                                  "alone")
            folder = files[0].parent
            manifest = verify_files(folder)  # every file's size and sha256, as lowbit.load checks
            if (manifest["files"].get(TENSOR_FILE) or {}).get("tensors") is None:
                raise FormatError(f"{folder}: the manifest does not list {TENSOR_FILE} as its tensors")
            if manifest["sparse"]:
                raise FormatError(f"{folder} stores pruned weights as bitmask and kept values, which "
                                  "transformers cannot read; load it with lowbit.load(path)")
            # Whatever runtime lowbit.load picks (the manifest's `runtime`), the folder holds the
            # quantized tensors, and inside transformers they run on PyTorch.
            self.folder, self.manifest = folder, manifest
            self.names = _name_map(list(manifest["modules"]), model)
            swap_in(model, {self.names[name]: entry for name, entry in manifest["modules"].items()
                            if name in self.names}, str(folder))
            # Tied weights (an LM head sharing the embedding's codes) are lowbit's aliases, which
            # tie every buffer of the module (codes, scales, zero points), not one parameter.
            self.aliases = {_renamed_key(alias, self.names): _renamed_key(canonical, self.names)
                            for alias, canonical in manifest["aliases"].items()
                            if alias.rpartition(".")[0] in self.names}
            _untie_quantized(model, set(self.names.values()))
            aliased = {f"^{re.escape(alias)}$" for alias in self.aliases}  # tied after loading
            model._keys_to_ignore_on_load_missing = {*(model._keys_to_ignore_on_load_missing or ()), *aliased}

        def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
            tensors = read_tensors(self.folder, self.manifest)  # checked before the weights loaded
            _tie(model, self.aliases)
            expected = {_renamed_key(key, self.names): tensor for key, tensor in tensors.items()}
            _check_same(model, expected, str(self.folder))
            check_loaded(model, str(self.folder))
            return model

        def is_serializable(self) -> bool:
            return False  # save with lowbit.save, which writes the checksummed folder

        @property
        def is_trainable(self) -> bool:
            return False

    if METHOD not in auto.AUTO_QUANTIZER_MAPPING:
        auto.register_quantization_config(METHOD)(LowbitConfig)
        auto.register_quantizer(METHOD)(LowbitHfQuantizer)


def register_with_transformers() -> None:
    """Register lowbit's quantizer when transformers' registry is imported (now, if it is)."""
    after_import("transformers.quantizers.auto", _make_classes)
