"""A transformers folder quantized straight into a lowbit folder, shard by shard: the float weights
are read module by module (lowbit.families.lazy_weights) and each shard of quantized tensors is
written once full and leaves memory, so neither the float model nor the quantized one is ever
held whole. For the data-free recipes (round-to-nearest, HQQ), which round each module on its own;
the folder is what `lowbit.save(model, out, runtime="torch")` writes for the same model.

A module's quantized tensors are written when the next module's float weights are read (by then
it is finished), its buffers put on the meta device and its kernels' packed copies dropped. Modules
whose float weights were tied (an LM head and its embedding) stay in memory until the end, where
their tensors are stored once as a whole save stores them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from lowbit.algorithms import ALGORITHMS
from lowbit.errors import QuantizationError
from lowbit.families.lazy_weights import NamesDifferError, open_lazily, quantize_whole
from lowbit.families.registry import torch_kind_of
from lowbit.families.torch_folders import build_manifest, save
from lowbit.formats.atomic import atomic_folder
from lowbit.formats.lowbit_format import DEFAULT_SHARD_BYTES, ShardWriter, deduplicate, finish_folder
from lowbit.transform.quantize import quantize, quantized_modules
from lowbit.transform.recipe import Recipe, make_recipe


def data_free(recipe: Recipe) -> bool:
    """Whether every module of `recipe` (its overrides too) is rounded on its own, from its weight
    alone: no calibration, no activation ranges, nothing folded across modules."""
    recipes = [recipe, *recipe.overrides.values()]
    algorithms = [ALGORITHMS.get(r.algorithm) for r in recipes]
    return all(r.scheme != "static" and r.smoothing is None and not a.needs_hessian
               and a.scales_inputs is None for r, a in zip(recipes, algorithms, strict=True))


class _Spill:
    """Writes finished quantized modules to `shards` and frees them; tied modules are kept."""

    def __init__(self, model: nn.Module, shards: ShardWriter) -> None:
        self.model, self.shards = model, shards
        self.written: set[str] = set()  # state-dict names already in a shard
        self.done: set[str] = set()  # modules written
        owners: dict[int, list[str]] = {}
        for name, parameter in model.named_parameters(remove_duplicate=False):
            owners.setdefault(id(parameter), []).append(name.rpartition(".")[0])
        self.tied = {owner for names in owners.values() if len(names) > 1 for owner in names}

    def write_finished(self) -> None:
        """Queue every quantized module not yet written (a shard goes to disk when full), then put
        its buffers on meta and drop its kernels' packed copies."""
        for name, module in quantized_modules(self.model).items():
            if name in self.done or name in self.tied:
                continue
            state = module.state_dict(prefix=f"{name}.")
            self.shards.add(state)
            self.written.update(state)
            self.done.add(name)
            for key, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[key] = buffer.to("meta")
            getattr(module, "kernel_cache", {}).clear()


def quantize_into_folder(folder: str | Path, recipe: Any, out: str | Path, overwrite: bool = False,
                         max_shard_bytes: int = DEFAULT_SHARD_BYTES, **options: Any) -> Path:
    """Quantize the transformers model in `folder` with a data-free `recipe` into the lowbit
    folder `out` (runtime torch), shard by shard; returns `out`. Atomic: on any failure `out` is
    left as it was. `options` are `lowbit.quantize`'s (skip, overrides, fallback, progress)."""
    recipe = make_recipe(recipe)
    if not data_free(recipe) or options.get("calibration") is not None:
        raise QuantizationError("writing the folder while quantizing is for data-free recipes (round-to-"
                                "nearest, HQQ; weight-only or dynamic); quantize, then lowbit.save")
    try:
        model, weights = open_lazily(folder)
    except NamesDifferError as error:  # loaded whole, saved whole
        quantized = quantize_whole(folder, recipe, error, stacklevel=4, **options)
        return save(quantized, out, overwrite=overwrite, runtime="torch")
    with atomic_folder(out, overwrite) as staging:
        shards = ShardWriter(staging, max_shard_bytes)
        spill = _Spill(model, shards)
        weights.before_read = spill.write_finished
        quantized = quantize(model, recipe, weights=weights, **options)
        spill.write_finished()
        _write_rest(staging, quantized, shards, spill.written)
    return Path(out)


def _write_rest(staging: Path, model: nn.Module, shards: ShardWriter, written: set[str]) -> None:
    """The tensors not written yet (norms, tied modules), the family's files and the manifest."""
    manifest = build_manifest(model)
    manifest.update(runtime="eager", runtime_choice=None)
    kind = torch_kind_of(model)
    write_files = kind.write_files(model, {"recipe": manifest["recipe"]}) if kind.write_files else None
    unique, aliases = deduplicate({k: v for k, v in model.state_dict().items() if k not in written})
    shards.add(unique)
    finish_folder(staging, shards, manifest, write_files, aliases)
