"""Block by block: the Hessians of calibration inputs that GPTQ-class algorithms round against,
each block calibrated on the outputs of the blocks before it, already quantized.

As the GPTQ reference does: the model runs once on the calibration batches up to its first
block, whose inputs are kept; then, for each block in turn, its Linears' inputs are gathered
into Hessians (H = 2 X Xᵀ / n) while the float block runs on the kept inputs, the Linears are
rounded and swapped in, and the quantized block runs again to give the next block its inputs.
Only one block's activations and Hessians are held at a time, and each block sees the errors of
the quantized blocks before it, which it can then absorb. Padding tokens (attention mask 0) are
left out of the Hessians.

The blocks are the longest `nn.ModuleList` holding the modules to quantize (a transformer's
layers). Modules outside it (an LM head, embeddings) are rounded to nearest.
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


def find_blocks(model: nn.Module, names: Iterable[str]) -> tuple[str, nn.ModuleList]:
    """(dotted name, the ModuleList) of the list of blocks holding most of `names`."""
    names = list(names)
    best: tuple[int, str, nn.ModuleList] | None = None
    for prefix, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1:
            held = sum(name.startswith(f"{prefix}.") for name in names)
            if held and (best is None or held > best[0]):
                best = (held, prefix, module)
    if best is None:
        raise QuantizationError("block-by-block calibration needs a model whose layers are an "
                                "nn.ModuleList (a transformer's blocks); this one has none")
    return best[1], best[2]


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
    """Forward hooks summing 2 X Xᵀ over every token each named Linear sees. Linears fed the same
    tensor (query, key and value; gate and up) share one product per call of the block."""

    def __init__(self, block: nn.Module, modules: dict[str, nn.Module]) -> None:
        self.sums = {name: torch.zeros(m.in_features, m.in_features) for name, m in modules.items()}
        self.counts = dict.fromkeys(modules, 0)
        self.mask: torch.Tensor | None = None  # this call's real (not padding) tokens, when known
        # this call's (input, X Xᵀ, tokens) by input tensor, each kept alive with its tensor so that
        # no later input of the call can take over its memory (and its data_ptr) while it stands
        self.products: dict[tuple, tuple[torch.Tensor, torch.Tensor, int]] = {}
        self.handles = [block.register_forward_pre_hook(lambda *_: self.products.clear())]
        self.handles += [module.register_forward_hook(self._hook(name)) for name, module in modules.items()]

    def _hook(self, name: str):
        def hook(_module, inputs, _output):
            key = (inputs[0].data_ptr(), tuple(inputs[0].shape))
            if key not in self.products:
                rows = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
                if self.mask is not None and self.mask.numel() == rows.shape[0]:
                    rows = rows[self.mask.reshape(-1).bool()]
                self.products[key] = (inputs[0], rows.T @ rows, rows.shape[0])
            _, product, tokens = self.products[key]
            self.sums[name] += product
            self.counts[name] += tokens
        return hook

    def remove(self) -> dict[str, torch.Tensor]:
        for handle in self.handles:
            handle.remove()
        self.products.clear()
        return {name: 2 * total / max(self.counts[name], 1) for name, total in self.sums.items()}


def _warn_if_short(counts: dict[str, int], modules: dict[str, nn.Module]) -> None:
    """Warn when a layer saw fewer calibration tokens than it has inputs: its Hessian is then
    singular, and only the damping GPTQ always adds to the diagonal lets it go on; more
    calibration text rounds better."""
    short = {name: (counts[name], module.in_features) for name, module in modules.items()
             if name in counts and counts[name] < module.in_features}
    if short:
        name, (tokens, width) = next(iter(short.items()))
        more = f" and {len(short) - 1} more layers" if len(short) > 1 else ""
        warnings.warn(f"calibration gave {tokens} tokens, fewer than the {width} inputs of {name}{more}: "
                      "their Hessians are singular and GPTQ goes on only through the damping it adds "
                      "to their diagonal; pass more calibration text to round better", LowbitWarning,
                      stacklevel=4)


# (block name, its Linears' Hessians, a call giving the block's output on its first input): may
# change the float block and its Hessians before anything in it is rounded (AWQ's scaling)
BeforeRounding = Callable[[str, dict[str, torch.Tensor], Callable[[], torch.Tensor]], Any]


def _outside(model: nn.Module, prefix: str) -> list[str]:
    """The modules holding parameters of their own outside the blocks under `prefix`."""
    return [name for name, module in model.named_modules()
            if name != prefix and not name.startswith(f"{prefix}.")
            and next(module.parameters(False), None) is not None]


def quantize_blocks(model: nn.Module, names: list[str], batches: Iterable[Any], build: Build,
                    progress: bool = True, before_rounding: BeforeRounding | None = None,
                    weights: WeightReader | None = None) -> list[str]:
    """Replace the `names` inside the model's blocks, block by block, with `build(name, {"hessian":
    H})`; returns the names outside the blocks, left for the caller to round without inputs.
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
        for index, block in enumerate(blocks):
            if weights is not None:
                weights.load([f"{prefix}.{index}"])
            inside = [name for name in names if name.startswith(f"{prefix}.{index}.")]
            modules = {name: model.get_submodule(name) for name in inside}
            hessians = _Hessians(block, {n: m for n, m in modules.items() if hasattr(m, "in_features")})
            with torch.inference_mode():
                for (args, kwargs), mask in zip(calls, masks, strict=True):
                    hessians.mask = mask
                    block(*args, **kwargs)
            gathered = hessians.remove()
            if index == 0:
                _warn_if_short(hessians.counts, modules)
            if before_rounding is not None:
                before_rounding(f"{prefix}.{index}", gathered, _first_output(block, calls[0]))
            for name in inside:
                try:
                    replacement = build(name, {"hessian": gathered.get(name)})
                except QuantizationError as error:
                    raise QuantizationError(f"{name}: {error}") from None
                set_module(model, name, replacement)
            with torch.inference_mode():
                calls = [_with_hidden(call, _hidden(block(*call[0], **call[1]))) for call in calls]
            bar.advance(task)
    return [name for name in names if not name.startswith(f"{prefix}.")]
