"""A transformers model whose float weights stay in their safetensors files until a module needs
them: quantizing it holds one module's (or, for GPTQ and AWQ, one block's) float weights at a time,
so a model larger than memory is quantized from its shards (lowbit.transform.quantize's
`weights`). The quantized modules are a fraction of the model's size and are saved as usual.

The model is built from config.json with its parameters on the meta device (their buffers, such as
rotary frequencies, computed by the model's code); each parameter is read, as float32, from the
file that holds its tensor when `load` names its module, and its digest is recorded so that the
saved folder describes the same source as a whole-model load would.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.core.digest import digest_entries, tensor_entry
from lowbit.core.quantize import check_finite
from lowbit.errors import FormatError, LowbitWarning, ModelLoadError, QuantizationError
from lowbit.evaluate.memory import release_freed_memory
from lowbit.families import transformers as hf
from lowbit.formats.safetensors_layout import Layout, layout, read_tensor
from lowbit.transform.quantize import quantize

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def weight_files(folder: Path) -> dict[str, Path]:
    """{tensor name: the safetensors file holding it}, from the shards' index or the single file."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ModelLoadError(f"{index} is not a safetensors index: {error}") from None
        if not isinstance(weight_map, dict):
            raise ModelLoadError(f"{index}: weight_map is not an object")
        files = {}
        for key, name in weight_map.items():
            path = folder / str(name)
            if Path(str(name)).name != name or not path.is_file():
                raise ModelLoadError(f"{index} names {name!r} for {key!r}, which is not a file in {folder}")
            files[key] = path
        return files
    single = folder / SINGLE_FILE
    if not single.is_file():
        raise ModelLoadError(f"{folder} has no {SINGLE_FILE} or {INDEX_FILE} to read weights from")
    return dict.fromkeys(_keys(single), single)


def _keys(path: Path) -> list[str]:
    return list(_layout(path)[1])


class NamesDifferError(ModelLoadError):
    """The checkpoint's tensor names are not the model's parameter names (an older naming that
    transformers' own loader renames): it is loaded whole instead."""


def _layout(path: Path) -> Layout:
    try:
        return layout(path)
    except FormatError as error:
        raise ModelLoadError(str(error)) from None


class LazyWeights:
    """The float parameters of `model` (on the meta device), read from `files` module by module."""

    def __init__(self, model: nn.Module, files: dict[str, Path]) -> None:
        self.model, self.files = model, files
        self.before_read: Callable[[], None] | None = None  # called before each read (see `load`)
        self.names: dict[int, list[str]] = {}  # a parameter on meta (tied ones share it) -> its names
        self.read: dict[int, list[str]] = {}  # the same for parameters read from the files
        self.layouts: dict[Path, Layout] = {}  # each file's, read once
        for name, parameter in model.named_parameters(remove_duplicate=False):
            self.names.setdefault(id(parameter), []).append(name)
        missing = [names[0] for names in self.names.values() if not any(name in files for name in names)]
        buffers = dict(model.named_buffers(remove_duplicate=False))  # a checkpoint may hold them
        expected = {name for names in self.names.values() for name in names} | set(buffers)
        unexpected = sorted(set(files) - expected)
        if missing or unexpected:
            raise NamesDifferError(
                "the safetensors files do not hold this model's parameters under their names "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        state = model.state_dict(keep_vars=True)
        for name in buffers.keys() & state.keys() & files.keys():  # saved buffers (a norm's running
            state[name] = self._read_buffer(name)  # statistics) are read now, as a whole load does
        self.entries: dict[str, tuple[str, str]] = {  # state-dict name -> (its description, sha256)
            name: tensor_entry(tensor) for name, tensor in state.items() if not tensor.is_meta}
        self.order = list(state)
        self.bytes = sum(_float_bytes(tensor) for tensor in state.values())
        self.parameters = sum(parameter.numel() for parameter in model.parameters())

    def load(self, modules: Iterable[str]) -> None:
        """Read the parameters of the named modules (and of their submodules) still on meta,
        first calling `before_read` (lowbit.families.written_while_quantizing writes the modules
        quantized so far there) and handing back to the system what was freed before."""
        unread = {id(parameter): parameter for prefix in modules  # a tied parameter once
                  for parameter in self.model.get_submodule(prefix).parameters() if parameter.is_meta}
        if unread:
            if self.before_read is not None:
                self.before_read()
            release_freed_memory()
        for parameter in unread.values():
            self._read(parameter)

    def load_all(self) -> None:
        self.load([""])

    def release(self, modules: Iterable[str]) -> None:
        """Put the read parameters of the named modules back on meta, to be read again when next
        needed (an embedding and LM head GPTQ needs only before the first block and at the end)."""
        for prefix in modules:
            for parameter in list(self.model.get_submodule(prefix).parameters()):
                names = self.read.pop(id(parameter), None)
                if names is not None:
                    meta = nn.Parameter(parameter.to("meta"), requires_grad=False)
                    self.names[id(meta)] = names
                    self._put(names, parameter, meta)

    def source(self) -> dict[str, Any]:
        """The float model's description (lowbit.transform.quantize.describe_source), once every
        parameter has been read."""
        self.load_all()
        return {"class": type(self.model).__name__,
                "parameters": self.parameters,
                "bytes": self.bytes,
                "sha256": digest_entries((name, *self.entries[name]) for name in sorted(self.order))}

    def _tensor(self, key: str, shape: torch.Size) -> torch.Tensor:
        """The file's tensor `key`, checked against the `shape` the config gives, floats as float32
        (as a whole load makes them)."""
        path = self.files[key]
        if path not in self.layouts:
            self.layouts[path] = _layout(path)
        try:
            tensor = read_tensor(path, key, self.layouts[path])
        except FormatError as error:
            raise ModelLoadError(str(error)) from None
        if tuple(tensor.shape) != tuple(shape):
            raise ModelLoadError(f"{key} in {path.name} has shape {tuple(tensor.shape)}; "
                                 f"the model's config gives {tuple(shape)}")
        return tensor.float() if tensor.is_floating_point() else tensor

    def _read_buffer(self, name: str) -> torch.Tensor:
        owner, _, attribute = name.rpartition(".")
        module = self.model.get_submodule(owner)
        module._buffers[attribute] = self._tensor(name, module._buffers[attribute].shape)
        return module._buffers[attribute]

    def _read(self, parameter: nn.Parameter) -> None:
        names = self.names.pop(id(parameter))
        key = next(name for name in names if name in self.files)
        tensor = self._tensor(key, parameter.shape)
        try:
            check_finite(tensor, f"parameter {key!r}")
        except QuantizationError as error:
            raise ModelLoadError(str(error)) from None
        loaded, entry = nn.Parameter(tensor, requires_grad=False), tensor_entry(tensor)
        self._put(names, parameter, loaded)
        self.read[id(loaded)] = names
        self.entries.update(dict.fromkeys(names, entry))

    def _put(self, names: list[str], old: nn.Parameter, new: nn.Parameter) -> None:
        """`new` in place of `old` wherever a module still holds `old` (not in a module that a
        quantized one has replaced by now)."""
        for name in names:
            owner, _, attribute = name.rpartition(".")
            module = self.model.get_submodule(owner)
            if module._parameters.get(attribute) is old:
                module._parameters[attribute] = new


def _float_bytes(tensor: torch.Tensor) -> int:
    """Bytes the tensor takes once loaded (parameters as float32, as a whole-model load makes them)."""
    size = 4 if tensor.is_floating_point() else tensor.element_size()
    return tensor.numel() * size


def open_lazily(folder: str | Path) -> tuple[nn.Module, LazyWeights]:
    """The transformers model in `folder` with its parameters on meta, and what reads them."""
    folder = Path(folder)
    files = weight_files(folder)
    model = hf.empty_pretrained(folder)
    return model, LazyWeights(model, files)


def quantize_pretrained(folder: str | Path, recipe: Any = "w8a8-dynamic", out: str | Path | None = None,
                        **options: Any) -> nn.Module | Path:
    """`lowbit.quantize` of the transformers model in `folder`, its weights read from their
    safetensors files (sharded or not) only as each module, or each block for GPTQ and AWQ, is
    quantized: peak memory is about the quantized model plus one block, not the float model.
    (SmoothQuant and static recipes run the whole float model first, so they read it all.)
    A checkpoint whose tensor names differ from the model's is loaded whole, with a warning.

    With `out`, a data-free recipe's model is written there as it is made, a lowbit folder for
    PyTorch, each shard of quantized tensors leaving memory once written (`overwrite` and
    `max_shard_bytes` as for lowbit.save); returns the folder
    (lowbit.families.written_while_quantizing)."""
    if out is not None:
        from lowbit.families.written_while_quantizing import quantize_into_folder  # it builds on this file

        return quantize_into_folder(folder, recipe, out, **options)
    try:
        model, weights = open_lazily(folder)
    except NamesDifferError as error:
        return quantize_whole(folder, recipe, error, stacklevel=3, **options)
    return quantize(model, recipe, weights=weights, **options)


def quantize_whole(folder: str | Path, recipe: Any, error: NamesDifferError, stacklevel: int,
                   **options: Any) -> nn.Module:
    """The model in `folder` loaded whole by transformers (which renames the checkpoint's older
    tensor names) and quantized in place, with a warning saying why it was not read lazily."""
    warnings.warn(f"{error}: loading the whole model instead", LowbitWarning, stacklevel=stacklevel)
    return quantize(hf.load_pretrained(folder), recipe, inplace=True, **options)
