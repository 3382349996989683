"""Block by block: the Hessians of calibration inputs that GPTQ-class algorithms round against,
each block calibrated on the outputs of the blocks before it, already quantized.

As the GPTQ reference does: the model runs once on the calibration batches up to its first
block, whose inputs are kept; then, for each block in turn, its Linears' inputs are gathered
into Hessians (H = 2 X Xᵀ / n; a convolution's rows are the patches it reads, one Hessian per
group: lowbit.nn.registry's `input_rows`) while the float block runs on the kept inputs, they are
rounded and swapped in, and the quantized block runs again to give the next block its inputs.
Only one block's activations and Hessians are held at a time, and each block sees the errors of
the quantized blocks before it, which it can then absorb. Padding tokens (attention mask 0) are
left out of the Hessians.

The blocks are the `nn.ModuleList` or `nn.Sequential` holding most of the modules to quantize (a
transformer's layers, a CNN's stages, a plain stack of layers). Modules outside it that read
inputs (a CNN's stem, head and classifier, an untied LM head) are rounded last, against what
they read in one pass of the whole model; embeddings, and an LM head tied to one, are rounded to
nearest.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import torch
from torch import nn

from lowbit.data.batches import call_model
from lowbit.errors import CalibrationError, LowbitWarning, QuantizationError
from lowbit.nn.kinds import set_module
from lowbit.nn.registry import QModuleKind, qmodule_for
from lowbit.progress import progress_bar

Build = Callable[[str, dict[str, Any]], nn.Module]  # (module name, {"hessian": H}) -> its replacement
Inputs = list[tuple[tuple, dict]]  # positional and keyword arguments of one call of a block


CACHE_ARGUMENTS = frozenset({"cache", "past_key_values", "past_key_value", "layer_past"})


class WeightReader(Protocol):
    """Float weights read on demand (lowbit.families.lazy_weights): the model's parameters sit on
    the meta device until `load` names their modules; `release` puts them back there."""

    def load(self, modules: Iterable[str]) -> None: ...

    def load_all(self) -> None: ...

    def release(self, modules: Iterable[str]) -> None: ...

    def source(self) -> dict[str, Any]:
        """`describe_source` of the float model, once every parameter has been read."""
        ...


class _Stop(Exception):
    """Raised by the first block's hook: the rest of the model need not run."""


def find_blocks(model: nn.Module, names: Iterable[str]) -> tuple[str, nn.Module]:
    """(dotted name, the container) of the list of blocks holding most of `names`: an
    nn.ModuleList (a transformer's layers, a CNN's stages) or an nn.Sequential whose children run
    one after another (the model itself, for a plain stack of layers); the finer one on a tie."""
    names = list(names)
    best: tuple[int, int, str, nn.Module] | None = None
    for prefix, module in model.named_modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) > 1:
            held = sum(_within(name, prefix) for name in names)
            if held and (best is None or (held, len(module)) > best[:2]):
                best = (held, len(module), prefix, module)
    if best is None:
        raise QuantizationError("block-by-block calibration needs a model whose layers are an "
                                "nn.ModuleList or nn.Sequential (a transformer's blocks); this one has none")
    return best[2], best[3]


def _first_block_inputs(model: nn.Module, first: nn.Module, batches: list[Any]) -> Inputs:
    """The arguments the first block is called with, for each calibration batch."""
    captured: Inputs = []

    def hook(_module, args, kwargs):
        # no key/value cache: one left in would gather every calibration sequence's keys, and
        # each block would attend to all the sequences before (transformers names it `cache`,
        # `past_key_values` or `past_key_value` by version)
        kwargs = {name: value for name, value in kwargs.items()
                  if name not in CACHE_ARGUMENTS and not type(value).__name__.endswith("Cache")}
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        captured.append((args, kwargs))
        raise _Stop

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            with contextlib.suppress(_Stop):
                call_model(model, batch)
    finally:
        handle.remove()
    if len(captured) != len(batches):
        raise CalibrationError("the calibration batches did not reach the model's first block")
    return captured


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _first_output(block: nn.Module, call: tuple[tuple, dict]) -> Callable[[], torch.Tensor]:
    """A call giving `block`'s output (its hidden states) on the arguments `call`, run now or later."""
    def run() -> torch.Tensor:
        with torch.inference_mode():
            return _hidden(block(*call[0], **call[1]))
    return run


def _with_hidden(call: tuple[tuple, dict], hidden: torch.Tensor) -> tuple[tuple, dict]:
    args, kwargs = call
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


class _Hessians:
    """Forward hooks summing 2 X Xᵀ over every row of input each named module sees (a Linear's
    tokens, a convolution's patches: lowbit.nn.registry's `input_rows`), one product per group
    of a grouped convolution. Modules fed the same tensor alike (query, key and value; gate and
    up) share one product per call of the block."""

    def __init__(self, block: nn.Module, modules: dict[str, nn.Module]) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts = dict.fromkeys(modules, 0)
        self.mask: torch.Tensor | None = None  # this call's real (not padding) tokens, when known
        # this call's (input, X Xᵀ, rows) by input tensor, each kept alive with its tensor so that
        # no later input of the call can take over its memory (and its data_ptr) while it stands
        self.products: dict[tuple, tuple[torch.Tensor, torch.Tensor, int]] = {}
        self.handles = [block.register_forward_pre_hook(lambda *_: self.products.clear())]
        self.handles += [module.register_forward_hook(self._hook(name, qmodule_for(module)))
                         for name, module in modules.items()]

    def _hook(self, name: str, kind: QModuleKind):
        def hook(module, inputs, _output):
            key = (inputs[0].data_ptr(), tuple(inputs[0].shape), kind.name, kind.rows_key(module))
            if key not in self.products:
                rows = kind.input_rows(module, inputs[0].detach()).float()
                if self.mask is not None and self.mask.numel() == rows.shape[1]:
                    rows = rows[:, self.mask.reshape(-1).bool()]
                self.products[key] = (inputs[0], rows.transpose(1, 2) @ rows, rows.shape[1])
            _, product, count = self.products[key]
            self.sums[name] = self.sums[name] + product if name in self.sums else product.clone()
            self.counts[name] += count
        return hook

    def remove(self) -> dict[str, torch.Tensor]:
        """Each module's Hessian: (in, in), or (groups, columns, columns) for a grouped convolution."""
        for handle in self.handles:
            handle.remove()
        self.products.clear()
        return {name: self._squeezed(2 * total / max(self.counts[name], 1))
                for name, total in self.sums.items()}

    @staticmethod
    def _squeezed(hessian: torch.Tensor) -> torch.Tensor:
        return hessian[0] if hessian.shape[0] == 1 else hessian

    def widths(self) -> dict[str, int]:
        """The number of inputs (Hessian columns) of each module seen."""
        return {name: total.shape[-1] for name, total in self.sums.items()}


def _warn_if_short(hessians: _Hessians, stacklevel: int = 4) -> None:
    """Warn when a layer saw fewer calibration rows (tokens, patches) than it has inputs: its
    Hessian is then singular, and only the damping GPTQ always adds to the diagonal lets it go
    on; more calibration data rounds better."""
    short = {name: (hessians.counts[name], width) for name, width in hessians.widths().items()
             if hessians.counts[name] < width}
    if short:
        name, (rows, width) = next(iter(short.items()))
        more = f" and {len(short) - 1} more layers" if len(short) > 1 else ""
        warnings.warn(f"calibration gave {rows} tokens (or patches), fewer than the {width} inputs of "
                      f"{name}{more}: their Hessians are singular and GPTQ goes on only through the "
                      "damping it adds to their diagonal; pass more calibration data to round better",
                      LowbitWarning, stacklevel=stacklevel)


# (block name, its Linears' Hessians, a call giving the block's output on its first input): may
# change the float block and its Hessians before anything in it is rounded (AWQ's scaling)
BeforeRounding = Callable[[str, dict[str, torch.Tensor], Callable[[], torch.Tensor]], Any]


def _reading_inputs(modules: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Those of `modules` whose kind turns its inputs into Hessian rows (not a table)."""
    return {name: module for name, module in modules.items()
            if getattr(qmodule_for(module), "input_rows", None) is not None}


def _joined(prefix: str, child: int | str) -> str:
    return f"{prefix}.{child}" if prefix else str(child)


def _within(name: str, prefix: str) -> bool:
    """Whether the module `name` is `prefix` or inside it ("" holds every module)."""
    return not prefix or name == prefix or name.startswith(f"{prefix}.")


def _outside(model: nn.Module, prefix: str) -> list[str]:
    """The modules holding parameters of their own outside the blocks under `prefix`."""
    return [name for name, module in model.named_modules()
            if not _within(name, prefix) and next(module.parameters(False), None) is not None]


def quantize_blocks(model: nn.Module, names: list[str], batches: Iterable[Any], build: Build,
                    progress: bool = True, before_rounding: BeforeRounding | None = None,
                    weights: WeightReader | None = None) -> list[str]:
    """Replace the `names` inside the model's blocks, block by block, with `build(name, {"hessian":
    H})`, and then those outside the blocks that read inputs, against what they read in one more
    pass of the whole model; returns the names left for the caller to round without inputs (tables,
    a tied LM head).
    With `weights` (parameters on the meta device, read on demand), the modules outside the blocks
    are read only to run the calibration batches up to the first block, and each block just before
    it runs: one block's float weights in memory at a time."""
    batches = list(batches or [])
    if not batches:
        raise CalibrationError("calibration data is empty; GPTQ needs a few representative batches "
                               "(e.g. 32-128 sequences)")
    prefix, blocks = find_blocks(model, names)
    masks = [batch.get("attention_mask") if isinstance(batch, dict) else None for batch in batches]
    outside = _outside(model, prefix)
    if weights is not None:
        weights.load(outside)
    with torch.inference_mode():
        calls = _first_block_inputs(model, blocks[0], batches)
    if weights is not None:
        weights.release(outside)
    with progress_bar(progress) as bar:
        task = bar.add_task(f"calibrating {len(blocks)} blocks", total=len(blocks))
        for index in range(len(blocks)):
            block_name, block = _joined(prefix, index), blocks[index]
            if weights is not None:
                weights.load([block_name])
            inside = [name for name in names if _within(name, block_name)]
            modules = {name: model.get_submodule(name) for name in inside}
            hessians = _Hessians(block, _reading_inputs(modules))
            with torch.inference_mode():
                for (args, kwargs), mask in zip(calls, masks, strict=True):
                    hessians.mask = mask
                    block(*args, **kwargs)
            gathered = hessians.remove()
            if index == 0:
                _warn_if_short(hessians)
            if before_rounding is not None:
                before_rounding(block_name, gathered, _first_output(block, calls[0]))
            _replace(model, inside, gathered, build)
            block = blocks[index]  # the quantized block (itself replaced when it is one of `names`)
            with torch.inference_mode():
                calls = [_with_hidden(call, _hidden(block(*call[0], **call[1]))) for call in calls]
            bar.advance(task)
    outside_names = [name for name in names if not _within(name, prefix)]
    done = _quantize_outside(model, outside_names, batches, masks, build, weights, outside)
    return [name for name in outside_names if name not in done]


def _untied(model: nn.Module, names: list[str]) -> list[str]:
    """Those of `names` whose weight no other module shares (a tied LM head keeps its
    embedding's rounding, so the two still share one quantized table)."""
    owners: dict[int, int] = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            owners[id(weight)] = owners.get(id(weight), 0) + 1
    return [name for name in names if owners.get(id(model.get_submodule(name).weight), 0) == 1]


def _quantize_outside(model: nn.Module, names: list[str], batches: list[Any], masks: list, build: Build,
                      weights: WeightReader | None, outside: list[str]) -> set[str]:
    """Round the modules outside the blocks that read inputs (a CNN's stem, head and classifier, an
    untied LM head) against the Hessians of what they read when the whole model, its blocks
    already quantized, runs on the calibration batches; returns their names. Read lazily
    (`weights`), only the float modules outside the blocks are in memory for that pass."""
    modules = _reading_inputs({name: model.get_submodule(name) for name in _untied(model, names)})
    if not modules:
        return set()
    if weights is not None:
        weights.load(outside)
    hessians = _Hessians(model, modules)
    with torch.inference_mode():
        for batch, mask in zip(batches, masks, strict=True):
            hessians.mask = mask
            call_model(model, batch)
    gathered = hessians.remove()
    _warn_if_short(hessians, stacklevel=5)
    if weights is not None:
        weights.release([name for name in outside if name not in modules])
    _replace(model, list(modules), gathered, build)
    return set(modules)


def _replace(model: nn.Module, names: list[str], hessians: dict[str, torch.Tensor], build: Build) -> None:
    """Swap each named module for `build(name, {"hessian": H})`; an error names the module."""
    for name in names:
        try:
            replacement = build(name, {"hessian": hessians.get(name)})
        except QuantizationError as error:
            raise QuantizationError(f"{name}: {error}") from None
        set_module(model, name, replacement)
