"""The model walk: match modules to recipe rules, calibrate if needed, swap in quantized modules."""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from lowbit.algorithms import ALGORITHMS
from lowbit.core.digest import state_dict_sha256
from lowbit.core.granularity import SUPPORTED_GROUP_SIZES
from lowbit.errors import HardwareCompatibilityError, LowbitWarning, QuantizationError
from lowbit.nn import QUANTIZED_MODULES, LayerSpec
from lowbit.nn.kernels import missing_kernel
from lowbit.nn.kinds import module_kind, set_module
from lowbit.nn.qweight import round_to_nearest
from lowbit.nn.registry import qmodule_for
from lowbit.nn.rounding import attach_roundings
from lowbit.progress import progress_bar
from lowbit.transform.awq import scale_block
from lowbit.transform.calibrate import CalibrationResult, calibrate
from lowbit.transform.fold import (
    Links,
    fold_batch_norms,
    links_for,
    rounding_readers,
    share_grids,
    trace_links,
)
from lowbit.transform.recipe import Recipe, make_recipe
from lowbit.transform.sequential import BeforeRounding, WeightReader, quantize_blocks
from lowbit.transform.smooth import smooth, smoothing_pairs

RECIPE_ATTRIBUTE = "lowbit_recipe"


def matches_glob(name: str, pattern: str) -> bool:
    """Glob on the dotted module name; a pattern also covers the submodules of what it names."""
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, pattern + ".*")


def recipe_for(name: str, recipe: Recipe) -> Recipe | None:
    """The recipe that applies to one module name: None when skipped, else the first override."""
    if any(matches_glob(name, pattern) for pattern in recipe.skip):
        return None
    for pattern, override in recipe.overrides.items():
        if matches_glob(name, pattern):
            return override
    return recipe


def plan(
    model: nn.Module, recipe: Recipe, fallback: Recipe | None = None,
) -> tuple[dict[str, LayerSpec], list[str]]:
    """LayerSpecs for every module to quantize, and the names of quantizable modules kept in float.

    A group size that does not divide a module's input dimension adapts: the largest supported
    group below it that divides takes its place (SmolLM2's 576 takes groups of 64 for a request
    of 128), with one warning. A module the recipe still cannot quantize (no group divides it, a
    kernel this machine lacks) takes `fallback`'s spec, with a warning; without a fallback the
    first is an error and the second runs the reference kernel, with a warning.
    """
    specs, kept_float, adapted = {}, [], {}
    for name, module in model.named_modules():
        kind = module_kind(module)
        if kind is None:
            continue
        rule = recipe_for(name, recipe)
        if rule is None or (kind == "embedding" and not rule.embeddings):
            kept_float.append(name)
            continue
        spec = rule.layer_spec(kind)
        if kind == "conv" and spec.granularity.startswith("group:"):
            kept_float.append(name)  # grouped (int4, int5, GGUF's) convolutions have no kernel: float
            continue
        smaller = _dividing_group(module, spec)
        if smaller is not None:
            adapted[name] = (spec.granularity, smaller)
            spec = dataclasses.replace(spec, granularity=smaller)
        specs[name] = _supported_spec(name, module, kind, spec, fallback)
    if adapted:
        warnings.warn(_adapted_message(adapted), LowbitWarning, stacklevel=3)
    return specs, kept_float


def _adapted_message(adapted: dict[str, tuple[str, str]]) -> str:
    """One line for every module whose group adapted: what was asked, what each took."""
    taken: dict[tuple[str, str], list[str]] = {}
    for name, pair in adapted.items():
        taken.setdefault(pair, []).append(name)
    parts = [f"{new} for {len(names)} ({', '.join(names[:2])}{', ...' if len(names) > 2 else ''})"
             for (_, new), names in taken.items()]
    asked = next(iter(adapted.values()))[0]
    return (f"{asked} does not divide every input dimension, so the largest group that does is used: "
            + "; ".join(parts))


def _dividing_group(module: nn.Module, spec: LayerSpec) -> str | None:
    """The largest supported group below `spec`'s that divides `module`'s input dimension, when
    `spec`'s group does not; None when it divides (or none does: that stays an error)."""
    if not spec.granularity.startswith("group:"):
        return None
    group, width = int(spec.granularity.split(":")[1]), module.weight.shape[-1]
    if width % group == 0:
        return None
    smaller = [size for size in SUPPORTED_GROUP_SIZES if size < group and width % size == 0]
    return f"group:{max(smaller)}" if smaller else None


def _problem(name: str, module: nn.Module, spec: LayerSpec) -> QuantizationError | None:
    if spec.granularity.startswith("group"):
        group = int(spec.granularity.split(":")[1])
        if module.weight.shape[-1] % group:
            return QuantizationError(
                f"group size {group} does not divide the input dimension {module.weight.shape[-1]} of "
                f"{name!r}; choose another group size, skip it, or fall back to another recipe for "
                "such modules (fallback='w8'; CLI: --fallback w8)")
    reason = missing_kernel(spec)
    return HardwareCompatibilityError(f"{name!r}: {reason}") if reason else None


def _supported_spec(name: str, module: nn.Module, kind: str, spec: LayerSpec,
                    fallback: Recipe | None) -> LayerSpec:
    problem = _problem(name, module, spec)
    if problem is None:
        return spec
    if fallback is not None:
        fallback_spec = fallback.layer_spec(kind)
        if _problem(name, module, fallback_spec) is None:
            warnings.warn(f"{problem} -> quantized with the fallback recipe instead", LowbitWarning,
                          stacklevel=4)
            return fallback_spec
    if isinstance(problem, HardwareCompatibilityError):
        warnings.warn(f"{problem} -> running the (slow, exact) reference kernel", LowbitWarning, stacklevel=4)
        return spec
    raise problem


def build_module(module: nn.Module, spec: LayerSpec, ranges: dict | None = None,
                 algorithm: str = "rtn") -> nn.Module:
    """The quantized replacement of one float module (lowbit.nn.registry says which), its weight
    rounded by `algorithm` (lowbit.algorithms)."""
    kind = qmodule_for(module)
    if kind is None:
        raise QuantizationError(f"lowbit does not quantize a {type(module).__name__}")
    ranges, weight = ranges or {}, module.weight.detach().float()
    rounding = ALGORITHMS.get(algorithm)
    if rounding.needs_hessian and ranges.get("hessian") is not None:
        rounded = rounding.round(weight, spec, ranges["hessian"])
    else:  # data-free; or no calibration input reached it (a table, a head outside the blocks)
        rounded = (round_to_nearest if rounding.needs_hessian else rounding.round)(weight, spec)
    return kind.build(module, spec, {**ranges, "weight": rounded})


WEIGHT_BUFFERS = ("weight", "weight_scale", "weight_zero_point", "weight_minimum")


def weight_storage(module: nn.Module) -> tuple[int, tuple[int, ...]]:
    """Where a module's weight lives: tied modules give the same (a weight still on the meta device,
    not read yet, has no memory: the parameter itself tells tied ones apart)."""
    weight = module.weight
    return (id(weight) if weight.is_meta else weight.data_ptr()), tuple(weight.shape)


def share_tied_weights(model: nn.Module, storages: dict[str, tuple[int, tuple[int, ...]]]) -> None:
    """Modules that shared one float weight (a tied embedding and LM head) share their quantized
    buffers too when both quantized it to identical values, so memory and the file hold it once."""
    first: dict[tuple, nn.Module] = {}
    for name, storage in storages.items():
        module = model.get_submodule(name)
        if storage not in first:
            first[storage] = module
        elif _same_quantized_weight(first[storage], module):
            for buffer in WEIGHT_BUFFERS:
                if hasattr(module, buffer):
                    setattr(module, buffer, getattr(first[storage], buffer))
            getattr(module, "kernel_cache", {}).clear()


def _same_quantized_weight(a: nn.Module, b: nn.Module) -> bool:
    for buffer in WEIGHT_BUFFERS:
        x, y = getattr(a, buffer, None), getattr(b, buffer, None)
        if (x is None) != (y is None):
            return False
        if x is not None and (x.shape != y.shape or x.dtype != y.dtype or not torch.equal(x, y)):
            return False
    return True


def _static_ranges(model, specs, recipe, calibration, progress) -> tuple[dict[str, dict], dict[str, str],
                                                                         list[str]]:
    """Calibrated ranges of the static modules, which module makes each convolution's input
    (lowbit.transform.fold.tensor_sources), and which modules' outputs the model returns."""
    static = [name for name, spec in specs.items() if spec.scheme == "static"]
    if not static:
        return {}, {}, []
    if calibration is None:
        raise QuantizationError(
            "the static scheme needs calibration data: pass calibration=[batch, ...] "
            "(CLI: --calibration FILE), or use 'w8a8-dynamic', which needs none"
        )
    if not isinstance(calibration, CalibrationResult):
        calibration = calibrate(model, calibration, static, progress)
    options = {"percentile": recipe.percentile} if recipe.calibrator == "percentile" else {}
    return calibration.ranges(recipe.calibrator, static, **options), calibration.sources, calibration.outputs


def with_float_outputs(model: nn.Module, specs: dict[str, LayerSpec], outputs: list[str]
                       ) -> dict[str, LayerSpec]:
    """`specs`, where a static Linear's output is the model's: left float (LayerSpec.output)."""
    def adapted(name: str, spec: LayerSpec) -> LayerSpec:
        returned = (spec.scheme == "static" and name in outputs
                    and module_kind(model.get_submodule(name)) == "linear")
        return dataclasses.replace(spec, output="float") if returned else spec

    return {name: adapted(name, spec) for name, spec in specs.items()}


def _input_scaling(target: nn.Module, specs: dict[str, LayerSpec], recipe: Recipe) -> BeforeRounding | None:
    """AWQ's per-block scaling (lowbit.transform.awq) when the recipe's algorithm scales inputs."""
    search = ALGORITHMS.get(recipe.algorithm).scales_inputs
    if search is None:
        return None
    if not smoothing_pairs(target):
        warnings.warn(f"{recipe.algorithm} scales the inputs of Llama-style decoders' Linears (norm → "
                      f"projections); {type(target).__name__} has none, so only its clipping search applies",
                      LowbitWarning, stacklevel=4)
        return None

    # only Linears whose own algorithm scales inputs: an override to another algorithm keeps its
    # columns as they are, and so does the norm or Linear feeding it
    scaled = {name: spec for name, spec in specs.items()
              if ALGORITHMS.get(recipe_for(name, recipe).algorithm).scales_inputs is not None}

    def before_rounding(block: str, hessians: dict[str, torch.Tensor],
                        run: Callable[[], torch.Tensor]) -> None:
        scale_block(target, block, hessians, scaled, search, run)
    return before_rounding


def _quantize_with_inputs(target: nn.Module, specs: dict[str, LayerSpec], recipe: Recipe,
                          calibration: Any, build: Callable[..., nn.Module], progress: bool,
                          weights: WeightReader | None) -> list[str]:
    """Quantize, block by block (lowbit.transform.sequential), the modules whose algorithm rounds
    against their calibration inputs (GPTQ); returns the names still to quantize."""
    needing = [name for name in specs if ALGORITHMS.get(recipe_for(name, recipe).algorithm).needs_hessian]
    if not needing:
        return list(specs)
    if calibration is None or isinstance(calibration, CalibrationResult):
        raise QuantizationError("GPTQ rounds each layer against its calibration inputs: pass calibration="
                                "[batch, ...] (CLI: --calibration FILE); a CalibrationResult holds only "
                                "activation ranges")
    scaling = _input_scaling(target, specs, recipe)
    outside = quantize_blocks(target, needing, calibration, build, progress, scaling, weights)
    done = set(needing) - set(outside)
    return [name for name in specs if name not in done]


def quantize(
    model: nn.Module,
    recipe: Recipe | str | dict | None = "w8a8-dynamic",
    calibration: Iterable[Any] | CalibrationResult | None = None,
    skip: Iterable[str] | None = None,
    overrides: dict[str, Recipe | str] | None = None,
    inplace: bool = False,
    progress: bool = True,
    fallback: Recipe | str | None = None,
    weights: WeightReader | None = None,
) -> nn.Module:
    """Return a quantized copy of `model` (the model itself when `inplace`).

    `recipe` is a preset name ("w8a8-dynamic", "w8a8-static", "w8", "w4", "fp16", "bf16") or a
    Recipe; `skip` lists module-name globs kept in float; `overrides` maps globs to other recipes;
    `fallback` is the recipe for modules the recipe cannot quantize here (see `plan`).
    `calibration` is a list of batches or a `CalibrationResult` from `lowbit.calibrate`.
    `weights` reads the parameters of a model built on the meta device as each module (each block,
    for GPTQ and AWQ) is quantized: the model is then quantized in place, one module's float
    weights in memory at a time (`lowbit.quantize_pretrained` builds both from a folder).
    """
    if not isinstance(model, nn.Module):
        raise QuantizationError(f"expected a torch.nn.Module, got {type(model).__name__}")
    recipe = make_recipe(recipe)
    if calibration is not None and not isinstance(calibration, (CalibrationResult, list, tuple)):
        calibration = list(calibration)  # read more than once (smoothing, ranges, GPTQ)
    changes = {}
    if skip:
        changes["skip"] = (*recipe.skip, *skip)
    if overrides:
        changes["overrides"] = {**recipe.overrides, **overrides}
    recipe = make_recipe(recipe, **changes)
    specs, _ = plan(model, recipe, make_recipe(fallback) if fallback is not None else None)
    if not specs:
        raise QuantizationError(
            "nothing to quantize: the model has no Linear, Conv2d or Embedding outside `skip`"
        )
    if weights is not None and _reads_whole_model(model, specs, recipe):
        weights.load_all()
    source = describe_source(model) if weights is None else None
    target = model if inplace or weights is not None else _copy_for_quantizing(model, list(specs), recipe)
    _smooth(target, recipe, calibration)
    links = _fold(target, list(specs), calibration)
    ranges, sources, outputs = _static_ranges(target, specs, recipe, calibration, progress)
    specs = with_float_outputs(target, specs, outputs)
    fused = share_grids(ranges, links)
    readers = rounding_readers(ranges, sources, links)
    storages = {name: weight_storage(target.get_submodule(name)) for name in specs}

    def build(name: str, extra: dict | None = None) -> nn.Module:
        if weights is not None:
            weights.load([name])
        return build_module(target.get_submodule(name), specs[name],
                            {**ranges.get(name, {}), **(extra or {})}, recipe_for(name, recipe).algorithm)

    remaining = _quantize_with_inputs(target, specs, recipe, calibration, build, progress, weights)
    with progress_bar(progress) as bar:
        step = bar.add_task(f"quantizing {len(remaining)} modules", total=len(remaining))
        for name in remaining:
            set_module(target, name, build(name))
            bar.advance(step)
    share_tied_weights(target, storages)
    attach_roundings(target, {source: _input_grid(target.get_submodule(reader))
                              for source, reader in readers.items()})
    target.lowbit_folded, target.lowbit_fused = dict(links.batch_norms), fused
    example = _example_input(calibration)
    if example is not None:
        target.lowbit_example_input = example
    setattr(target, RECIPE_ATTRIBUTE, recipe)
    target.lowbit_source = source if weights is None else weights.source()
    return target.eval()


def _reads_whole_model(model: nn.Module, specs: dict[str, LayerSpec], recipe: Recipe) -> bool:
    """Whether quantizing runs the whole float model before rounding anything (SmoothQuant's and
    static ranges' calibration, tracing convolutions to fold), so it cannot read weights module by
    module."""
    modules = dict(model.named_modules())
    return (recipe.smoothing is not None or any(spec.scheme == "static" for spec in specs.values())
            or any(isinstance(modules[name], nn.Conv2d) for name in specs))


def _copy_for_quantizing(model: nn.Module, names: list[str], recipe: Recipe) -> nn.Module:
    """A deep copy of `model` in which the modules named `names`, each about to be replaced by a
    quantized module, still hold the original's weight tensors: the float weights stay in memory
    once (SmolLM2-135M w4-g64 peaked at 2.3 GB RSS with a full copy, 540 MB of it the copy's
    weights). Nothing writes those tensors; quantizing reads them. SmoothQuant and batch-norm
    folding change weights in place before they are replaced, so with either the copy is full."""
    folds = any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in model.modules())
    if recipe.smoothing is not None or folds or ALGORITHMS.get(recipe.algorithm).scales_inputs is not None:
        return copy.deepcopy(model)
    weights = [getattr(model.get_submodule(name), "weight", None) for name in names]
    shared = {id(weight): weight for weight in weights if isinstance(weight, torch.Tensor)}
    return copy.deepcopy(model, memo=shared)


def _smooth(target: nn.Module, recipe: Recipe, calibration: Any) -> None:
    """SmoothQuant before anything is quantized, when the recipe asks (lowbit.transform.smooth)."""
    if recipe.smoothing is None:
        return
    if calibration is None or isinstance(calibration, CalibrationResult):
        raise QuantizationError("SmoothQuant measures each channel's activations: pass calibration=[batch, "
                                "...] (CLI: --calibration FILE); a CalibrationResult holds only ranges")
    smooth(target, list(calibration), recipe.smoothing)


def _fold(target: nn.Module, names: list[str], calibration: Any) -> Links:
    """Fold batch norms into the convolutions before them (lowbit.transform.fold), as the
    calibration did: a CalibrationResult that folded other batch norms (an older lowbit's, or one
    recorded on another model) leaves the model unfolded, with a warning."""
    recorded = calibration.folded if isinstance(calibration, CalibrationResult) else None
    links = trace_links(target) if recorded else links_for(target, names)
    if recorded is not None and recorded != links.batch_norms:
        warnings.warn("this calibration folded other batch norms than this model has, so none is folded; "
                      "calibrate this model again to fold them", LowbitWarning, stacklevel=3)
        return Links()
    fold_batch_norms(target, links.batch_norms)
    return links


def _input_grid(module: nn.Module) -> tuple[float, int]:
    """A built static module's input grid: what a rounding point before it rounds onto."""
    return float(module.input_scale), int(module.input_zero_point)


def _example_input(calibration: Any) -> torch.Tensor | None:
    """One sample of the first calibration batch, when batches are plain tensors: what an
    exporter traces a plain torch model with."""
    if calibration is None or isinstance(calibration, CalibrationResult):
        return None
    first = next(iter(calibration), None) if isinstance(calibration, (list, tuple)) else None
    return first[:1].detach().clone() if isinstance(first, torch.Tensor) and first.dim() > 0 else None


def describe_source(model: nn.Module) -> dict[str, Any]:
    """What the float model was: class, parameter count, bytes, and a sha256 of its state dict."""
    state = model.state_dict()
    return {
        "class": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "bytes": sum(t.numel() * t.element_size() for t in state.values()),
        "sha256": state_dict_sha256(state),
    }


def empty_module(module: nn.Module, spec: LayerSpec) -> nn.Module:
    """A quantized module shaped like `module`, with zeroed buffers to load saved tensors into."""
    kind = qmodule_for(module)
    if kind is None:
        raise QuantizationError(f"cannot rebuild a quantized {type(module).__name__}")
    return kind.empty(module, spec)


def rebuild(model: nn.Module, specs: dict[str, LayerSpec]) -> nn.Module:
    """Swap the named float modules of a skeleton for empty quantized ones (used when loading)."""
    modules = dict(model.named_modules())
    missing = [name for name in specs if name not in modules]
    if missing:
        raise QuantizationError(
            f"the model has no module {missing[0]!r}; is this the architecture that was quantized?"
        )
    for name, spec in specs.items():
        set_module(model, name, empty_module(modules[name], spec))
    return model


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The lowbit modules inside a model, by name."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, QUANTIZED_MODULES)
    }
