"""Quantization-aware training: `prepare` puts a FakeQuant (lowbit.nn.fake_quant) where the recipe
would put a quantized module, the user (or `lowbit.distill`) trains, and `convert` gives the same
quantized modules, file format and runtimes as post-training quantization.

As in torch.ao's and NNCF's QAT, the model trains on the rounding it will run with; batch norms
before convolutions are folded first (lowbit.transform.fold), so what trains is what converts.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from lowbit.algorithms import ALGORITHMS
from lowbit.core import QuantizedTensor
from lowbit.errors import LowbitWarning, QuantizationError
from lowbit.nn.fake_quant import FakeQuant
from lowbit.nn.kinds import set_module
from lowbit.nn.registry import qmodule_for
from lowbit.nn.rounding import attach_fake_roundings, attach_roundings, detach_fake_roundings
from lowbit.nn.spec import LayerSpec
from lowbit.progress import progress_bar
from lowbit.transform.fold import Links, rounding_readers, share_grids
from lowbit.transform.quantize import (
    RECIPE_ATTRIBUTE,
    _example_input,
    _fold,
    _static_ranges,
    describe_source,
    plan,
    quantize,
    quantized_modules,
    share_tied_weights,
    weight_storage,
    with_float_outputs,
)
from lowbit.transform.recipe import Recipe, make_recipe

QAT_ATTRIBUTE = "lowbit_qat"


@dataclass
class Prepared:
    """What `prepare` recorded on the model for `convert`: the recipe, the float source it
    started from, the batch norms it folded, the activations it fused into output grids, the
    module outputs it rounds (lowbit.nn.rounding)
    and what training did (lowbit.distill adds to it)."""

    recipe: Recipe
    source: dict[str, Any]
    folded: dict[str, str]
    fused: dict[str, list[float | None]]
    roundings: dict[str, tuple[float, int]] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)


def refuse_integer_modules(model: nn.Module, doing: str) -> None:
    """A converted model holds integers that cannot learn: say so before anything changes."""
    converted = list(quantized_modules(model))
    if converted:
        raise QuantizationError(
            f"cannot {doing}: the model holds quantized (integer) modules, e.g. {converted[0]!r}, "
            "which cannot train; prepare the float model (lowbit.qat.prepare), train it, then convert")


def prepare(
    model: nn.Module,
    recipe: Recipe | str | dict | None = "w8a8-dynamic",
    calibration: Iterable[Any] | None = None,
    learn_scales: bool = False,
    skip: Iterable[str] | None = None,
    inplace: bool = False,
    progress: bool = True,
    learn_ranges: bool = False,
) -> nn.Module:
    """A copy of `model` (the model itself when `inplace`) whose modules the recipe quantizes
    train on their quantized numerics; `convert` turns it into the quantized model.

    The static scheme needs `calibration` batches for its activation grids, as `lowbit.quantize`
    does. `learn_scales` makes each weight scale a parameter (LSQ) instead of taking it from the
    weight's range at every step; `learn_ranges` makes the static scheme's activation ranges
    parameters too, starting from their calibrated values (those shared with another module, by
    fusion or a common input, stay as calibrated). Train the result with your own loop, or with
    `lowbit.distill`.
    """
    if not isinstance(model, nn.Module):
        raise QuantizationError(f"expected a torch.nn.Module, got {type(model).__name__}")
    refuse_integer_modules(model, "prepare this model for quantization-aware training")
    if getattr(model, QAT_ATTRIBUTE, None) is not None:
        raise QuantizationError("this model is already prepared for quantization-aware training")
    recipe = make_recipe(recipe, skip=(*make_recipe(recipe).skip, *skip) if skip else None)
    _warn_ignored(recipe)
    specs, _ = plan(model, recipe)
    if not specs:
        raise QuantizationError("nothing to train: the model has no Linear, Conv2d or Embedding "
                                "outside `skip`")
    if any(spec.zero_point == "minimum" for spec in specs.values()):
        raise QuantizationError("quantization-aware training rounds onto grids through zero; a grid with a "
                                "minimum (a Q4_1 recipe) is for post-training quantization only")
    _check_learnable(learn_ranges, specs)
    calibration = list(calibration) if calibration is not None else None
    source = describe_source(model)
    target = model if inplace else copy.deepcopy(model)
    rounded = _algorithm_roundings(model, recipe, calibration, progress)
    links = _fold(target, list(specs), calibration)
    ranges, sources, outputs = _static_ranges(target, specs, recipe, calibration, progress)
    specs = with_float_outputs(target, specs, outputs)
    fused = share_grids(ranges, links)  # the grids post-training quantization gives (lowbit.transform.fold)
    readers = rounding_readers(ranges, sources, links)
    shared = _shared_grids(links, sources, fused) if learn_ranges else set()
    for name, spec in specs.items():
        grids = ranges.get(name, {})
        learned = tuple(side for side in ("input", "output") if learn_ranges and (name, side) not in shared)
        set_module(target, name, FakeQuant(target.get_submodule(name), spec, learn_scales,
                                           grids.get("input"), grids.get("output"), learned,
                                           rounded.get(name)))
    roundings = {source: target.get_submodule(reader).grid("input")[:2] for source, reader in readers.items()}
    attach_fake_roundings(target, roundings)
    setattr(target, QAT_ATTRIBUTE, Prepared(recipe, source, dict(links.batch_norms), fused, roundings))
    example = _example_input(calibration)
    if example is not None:
        target.lowbit_example_input = example
    return target


def _shared_grids(links: Links, sources: dict[str, str], fused: dict) -> set[tuple[str, str]]:
    """(module, "input" or "output") of each static grid another module shares (a producer's
    output read on its consumer's input grid, convolutions reading one tensor, an output fused
    with its activation): such a grid cannot move for one of them alone."""
    shared = {(name, "output") for name in fused} | {(conv, "input") for conv in sources}
    for consumer, producer in links.producers.items():
        shared |= {(consumer, "input"), (producer, "output")}
    return shared


def _check_learnable(learn_ranges: bool, specs: dict[str, LayerSpec]) -> None:
    """Refused before any work: learned ranges for a recipe without static grids."""
    if learn_ranges and not any(spec.scheme == "static" for spec in specs.values()):
        raise QuantizationError("learn_ranges trains the static scheme's activation ranges; this recipe "
                                "quantizes no activations statically (use e.g. 'w8a8-static')")


def _starts_from_algorithm(recipe: Recipe) -> bool:
    """Whether the weights start from the recipe's algorithm's rounding (GPTQ): one that only
    rounds each weight; AWQ's input scaling changes the model around it, HQQ's float zero points
    are no grid a FakeQuant trains on."""
    algorithm = ALGORITHMS.get(recipe.algorithm)
    return recipe.algorithm != "rtn" and algorithm.scales_inputs is None and not algorithm.float_zero_points


def _warn_ignored(recipe: Recipe) -> None:
    """A post-training algorithm that changes more than the rounding, or smoothing, does not
    apply to training."""
    if (recipe.algorithm != "rtn" and not _starts_from_algorithm(recipe)) or recipe.smoothing is not None:
        warnings.warn(f"quantization-aware training learns its own rounding, so the recipe's "
                      f"{recipe.algorithm!r} algorithm and smoothing do not apply; the weights start "
                      "from round-to-nearest", LowbitWarning, stacklevel=3)


def _algorithm_roundings(model: nn.Module, recipe: Recipe, calibration: list | None,
                         progress: bool) -> dict[str, QuantizedTensor]:
    """The weights as post-training quantization with the recipe's algorithm rounds them (GPTQ
    against each layer's calibration inputs), by module name; empty for round-to-nearest."""
    if not _starts_from_algorithm(recipe):
        return {}
    quantized = quantize(model, recipe, calibration=calibration, progress=progress)
    return {name: module.quantized_weight() for name, module in quantized_modules(quantized).items()}


def fake_quant_modules(model: nn.Module) -> dict[str, FakeQuant]:
    return {name: module for name, module in model.named_modules() if isinstance(module, FakeQuant)}


def prepared_state(model: nn.Module) -> Prepared:
    """What `prepare` recorded, or a clear error for a model it never saw."""
    state = getattr(model, QAT_ATTRIBUTE, None)
    if not isinstance(state, Prepared) or not fake_quant_modules(model):
        raise QuantizationError("this model was never prepared for quantization-aware training: call "
                                "lowbit.qat.prepare(model, recipe) first, train, then convert")
    return state


def convert(model: nn.Module, progress: bool = True) -> nn.Module:
    """The quantized model a prepared (and trained) model imitates: a new model with the same
    quantized modules, file format and runtimes as `lowbit.quantize` gives; `model` is kept."""
    state = prepared_state(model)
    target = copy.deepcopy(model)
    fakes = fake_quant_modules(target)
    storages = {name: weight_storage(fake.float_module) for name, fake in fakes.items()}
    with progress_bar(progress) as bar:
        step = bar.add_task(f"converting {len(fakes)} modules", total=len(fakes))
        for name, fake in fakes.items():
            set_module(target, name, quantized_module(fake))
            bar.advance(step)
    share_tied_weights(target, storages)
    detach_fake_roundings(target)
    attach_roundings(target, state.roundings)
    delattr(target, QAT_ATTRIBUTE)
    setattr(target, RECIPE_ATTRIBUTE, state.recipe)
    target.lowbit_source = state.source
    target.lowbit_folded, target.lowbit_fused = dict(state.folded), dict(state.fused)
    target.lowbit_training = dict(state.training) or None
    return target.eval()


def quantized_module(fake: FakeQuant) -> nn.Module:
    """The quantized module of one trained FakeQuant: its integers exactly as it trained on them."""
    float_module = fake.float_module
    kind = qmodule_for(float_module)
    return kind.build(float_module, fake.spec, {"weight": fake.rounded(), **fake.ranges})

