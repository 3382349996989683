"""Pruning: weights set to zero before quantizing, to make a model's file smaller.

Two registries, keyed by name. A pattern says which zeros are allowed:
- "unstructured": in each row (an output's weights), the `sparsity` share scoring lowest become 0;
- "2:4": in each run of four consecutive inputs of a row, the two scoring lowest become 0 (the
  semi-structured pattern some GPUs run faster; 50% by construction).
A criterion says which weights score lowest, and whether the kept ones change:
- "magnitude": |W|, no data needed;
- "wanda": |W| x ||X|| on calibration batches (Sun et al., 2023: the magnitude times the L2 norm
  of the input it multiplies, so a small weight on a loud input is kept);
- "sparsegpt": on calibration batches, block by block, each Linear pruned by SparseGPT
  (lowbit.algorithms.sparsegpt), whose kept weights are updated to make up for the pruned ones
  (lowbit.transform.prune_sparsegpt).

Linear, Conv2d and Embedding weights are pruned (a convolution's row is its flattened
in-channels x kernel). The zeros stay zero through `lowbit.distill` (it puts them back after each
step) and quantize to 0 on a symmetric grid; `lowbit.save` stores such weights as a bitmask and
their kept values (lowbit.formats.sparse). This CPU has no sparse kernel: a pruned model is smaller
on disk, not faster, and lowbit reports it so.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowbit.data.batches import call_model
from lowbit.errors import PruningError
from lowbit.nn.kinds import module_kind
from lowbit.registry import Registry
from lowbit.transform.qat import refuse_integer_modules
from lowbit.transform.quantize import matches_glob

PRUNING_ATTRIBUTE = "lowbit_pruning"


@dataclass(frozen=True)
class Pattern:
    """`keep(scores, sparsity)`: the mask of the values kept, given their scores as rows of
    inputs. `window`: the fewest consecutive inputs of a row the rule can be applied to on its own
    (4 for 2:4; None when it needs whole rows), which lets SparseGPT choose as it goes."""

    keep: Callable[[torch.Tensor, float], torch.Tensor]
    window: int | None = None


PATTERNS: Registry[Pattern] = Registry("pruning pattern")


def lowest_in_each_row(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep all but the `sparsity` share of each row's values scoring lowest (ties broken by
    position, so exactly that share goes)."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    count = int(round(sparsity * scores.shape[1]))
    if count:
        keep.scatter_(1, scores.argsort(dim=1, stable=True)[:, :count], False)
    return keep


def two_of_four(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the two values scoring highest in every run of four inputs of a row."""
    groups = scores.reshape(-1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, groups.topk(2, dim=1).indices, True)
    return keep.reshape(scores.shape)


PATTERNS.add("unstructured", Pattern(lowest_in_each_row))
PATTERNS.add("2:4", Pattern(two_of_four, window=4))


@dataclass(frozen=True)
class Pruning:
    """One pruning's parameters, as the criteria receive them: the share to prune of each module
    by name, the pattern, the calibration batches (None for magnitude) and whether to show
    progress."""

    sparsities: dict[str, float]
    pattern: Pattern
    calibration: list[Any] | None
    progress: bool = True

    @property
    def names(self) -> list[str]:
        return list(self.sparsities)


@dataclass(frozen=True)
class Criterion:
    """`prune(model, pruning)` sets the model's weights to zero in place; `needs_data` says it
    scores on calibration batches."""

    prune: Callable[[nn.Module, Pruning], None]
    needs_data: bool


CRITERIA: Registry[Criterion] = Registry("pruning criterion")


def prune(
    model: nn.Module,
    sparsity: float = 0.5,
    pattern: str = "unstructured",
    calibration: Iterable[Any] | None = None,
    skip: Iterable[str] | None = None,
    inplace: bool = False,
    criterion: str | None = None,
    progress: bool = True,
    overrides: dict[str, float] | None = None,
) -> nn.Module:
    """A copy of `model` (the model itself when `inplace`) whose Linear, Conv2d and Embedding
    weights outside the `skip` globs are pruned to `sparsity` with `pattern` ("unstructured" or
    "2:4", which is 50% sparse). `criterion` chooses what goes: "magnitude", "wanda" (|W| x ||X||
    on `calibration`; far less lost) or "sparsegpt" (Wanda's data, and the kept weights updated to
    make up for the pruned ones; least lost, slowest); by default "wanda" with calibration batches,
    else "magnitude". `overrides` maps module-name globs to another sparsity for the modules they
    match (the first that matches): {"embeddings*": 0.6} prunes a transformer's embedding tables,
    which lose little to it, harder than its Linears. What was pruned is recorded in
    `model.lowbit_pruning` and, after quantizing, in lowbit.json. Quantize it with a symmetric
    recipe ("w8") to keep the zeros."""
    rule = _checked_pattern(pattern, sparsity)
    overrides = _checked_overrides(pattern, dict(overrides or {}))
    criterion = criterion or ("magnitude" if calibration is None else "wanda")
    method = _checked_criterion(criterion, calibration)
    if not isinstance(model, nn.Module):
        raise PruningError(f"expected a torch.nn.Module, got {type(model).__name__}")
    refuse_integer_modules(model, "prune this model")
    weights = _prunable(model, list(skip or ()))
    if not weights:
        raise PruningError("nothing to prune: the model has no Linear, Conv2d or Embedding outside `skip`")
    if pattern == "2:4":
        _check_divisible(model, weights)
    batches = None if calibration is None else list(calibration)
    if batches is not None and not batches:
        raise PruningError("the calibration batches are empty: pass some, or none to prune by magnitude")
    target = model if inplace else copy.deepcopy(model)
    sparsities = {name: _sparsity_for(name, sparsity, overrides) for name in weights}
    method.prune(target, Pruning(sparsities, rule, batches if method.needs_data else None, progress))
    pruned = {name: _zero_share(target.get_submodule(name).weight) for name in weights}
    setattr(target, PRUNING_ATTRIBUTE, {"pattern": pattern, "sparsity": 0.5 if pattern == "2:4" else sparsity,
                                        "criterion": criterion, "modules": pruned, "overrides": overrides})
    return target


def _sparsity_for(name: str, sparsity: float, overrides: dict[str, float]) -> float:
    return next((share for pattern, share in overrides.items() if matches_glob(name, pattern)), sparsity)


def prune_by_scores(model: nn.Module, names: Iterable[str], pruning: Pruning,
                    norms: dict[str, torch.Tensor]) -> None:
    """Zero the lowest-scoring weights of the named modules: |W|, times the input norms where
    `norms` has the module's (Wanda)."""
    with torch.no_grad():
        for name in names:
            module = model.get_submodule(name)
            rows = module.weight.reshape(module.weight.shape[0], -1)
            scores = rows.abs() * _input_weight(module, norms.get(name))
            kept = rows * pruning.pattern.keep(scores, pruning.sparsities[name])
            module.weight.copy_(kept.reshape(module.weight.shape))


def _zero_share(weight: torch.Tensor) -> float:
    return round(float((weight == 0).float().mean()), 4)


def _by_magnitude(model: nn.Module, pruning: Pruning) -> None:
    prune_by_scores(model, pruning.names, pruning, {})


def _by_wanda(model: nn.Module, pruning: Pruning) -> None:
    prune_by_scores(model, pruning.names, pruning, _input_norms(model, pruning.names, pruning.calibration))


CRITERIA.add("magnitude", Criterion(_by_magnitude, needs_data=False))
CRITERIA.add("wanda", Criterion(_by_wanda, needs_data=True))


def _input_norms(model: nn.Module, names: list[str], batches: Iterable[Any]) -> dict[str, torch.Tensor]:
    """Per input channel of each named Linear and ungrouped Conv2d, the L2 norm of what it reads
    over `batches` (Wanda's ||X||)."""
    squares: dict[str, torch.Tensor] = {}

    def record(name: str, channels_last: bool):
        def hook(_: nn.Module, inputs: tuple) -> None:
            x = inputs[0].detach().float()
            x = x.reshape(-1, x.shape[-1]) if channels_last else x.transpose(0, 1).reshape(x.shape[1], -1).T
            squares[name] = squares.get(name, 0) + x.square().sum(0)
        return hook

    modules = {name: model.get_submodule(name) for name in names}
    readers = {name: module for name, module in modules.items()
               if isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)}
    handles = [module.register_forward_pre_hook(record(name, isinstance(module, nn.Linear)))
               for name, module in readers.items()]
    try:
        with torch.inference_mode():
            for batch in batches:
                call_model(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return {name: total.sqrt() for name, total in squares.items()}


def _input_weight(module: nn.Module, norms: torch.Tensor | None) -> torch.Tensor | float:
    """What each value of a weight row is multiplied by in its score: its input's norm (repeated
    over a convolution's kernel), or 1 without calibration (magnitude)."""
    if norms is None:
        return 1.0
    if isinstance(module, nn.Conv2d):
        norms = norms.repeat_interleave(module.weight[0, 0].numel())
    return norms.reshape(1, -1)


def _checked_pattern(pattern: str, sparsity: float) -> Pattern:
    if pattern not in PATTERNS:
        raise PruningError(f"unknown pruning pattern {pattern!r}; choose one of {', '.join(PATTERNS)}")
    _check_share(sparsity)
    if pattern == "2:4" and sparsity != 0.5:
        raise PruningError(f"the 2:4 pattern prunes exactly half of each weight; got sparsity {sparsity}")
    return PATTERNS.get(pattern)


def _check_share(share: object, where: str = "") -> None:
    if isinstance(share, bool) or not isinstance(share, int | float) or not 0 <= share < 1:
        raise PruningError(f"sparsity must be a share of the weights in [0, 1), got {share!r}{where}")


def _checked_overrides(pattern: str, overrides: dict[str, float]) -> dict[str, float]:
    if overrides and pattern == "2:4":
        raise PruningError("the 2:4 pattern prunes exactly half of every weight: it takes no overrides")
    for glob, share in overrides.items():
        _check_share(share, f" for {glob!r}")
    return {glob: float(share) for glob, share in overrides.items()}


def _checked_criterion(criterion: str, calibration: Iterable[Any] | None) -> Criterion:
    if criterion not in CRITERIA:
        raise PruningError(f"unknown pruning criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    method = CRITERIA.get(criterion)
    if method.needs_data and calibration is None:
        raise PruningError(f"the {criterion} criterion scores weights on calibration batches: pass "
                           "calibration=[batch, ...] (CLI: --calibration FILE), or use 'magnitude'")
    return method


def _weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weight of each float Linear, Conv2d and Embedding by module name (a FakeQuant's float
    module included, so a model prepared for QAT prunes too)."""
    found = {name: getattr(module, "weight", None) for name, module in model.named_modules()
             if module_kind(module) is not None}
    return {name: weight for name, weight in found.items() if isinstance(weight, nn.Parameter)}


def _prunable(model: nn.Module, skip: list[str]) -> list[str]:
    """Names of the modules with a prunable weight outside the `skip` globs."""
    return [name for name in _weights(model) if not any(matches_glob(name, pattern) for pattern in skip)]


def _check_divisible(model: nn.Module, names: list[str]) -> None:
    """2:4 groups run along each row's inputs: a row length not divisible by 4 is refused."""
    for name in names:
        weight = model.get_submodule(name).weight
        inputs = weight[0].numel()
        if inputs % 4:
            raise PruningError(f"the 2:4 pattern needs rows of a multiple of 4 inputs; {name!r} has "
                               f"{inputs} (weight {list(weight.shape)}): skip it (skip=[{name!r}]) or "
                               "prune unstructured")


def keep_pruned_zeros(model: nn.Module) -> Callable[[], None]:
    """For a pruned model, a function that puts the pruned zeros back (after an optimizer step, so
    training cannot undo pruning); for any other model, one that does nothing."""
    if getattr(model, PRUNING_ATTRIBUTE, None) is None:
        return lambda: None
    zeros = [(weight, weight.detach() == 0) for weight in _weights(model).values()]
    zeros = [(weight, mask) for weight, mask in zeros if mask.any()]

    def restore() -> None:
        with torch.no_grad():
            for weight, mask in zeros:
                weight.masked_fill_(mask, 0)
    return restore


from lowbit.transform import prune_sparsegpt  # noqa: E402,F401 - registers the "sparsegpt" criterion
