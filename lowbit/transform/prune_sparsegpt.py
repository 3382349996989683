"""The "sparsegpt" pruning criterion: the model walked block by block as GPTQ walks it
(lowbit.transform.sequential), each Linear in a block pruned by SparseGPT
(lowbit.algorithms.sparsegpt) against the Hessian of its inputs, and each block calibrated on the
outputs of the blocks before it, already pruned, so it can make up for their loss too.

SparseGPT needs a Linear's inputs: Linears outside the blocks are pruned against what they read in
one more pass of the whole model; tables, a tied head and convolutions are pruned by magnitude.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lowbit.algorithms.gptq import BLOCK
from lowbit.algorithms.sparsegpt import sparsegpt
from lowbit.errors import CalibrationError, PruningError, QuantizationError
from lowbit.transform.prune import CRITERIA, Criterion, Pruning, prune_by_scores
from lowbit.transform.sequential import quantize_blocks


def prune_blocks(model: nn.Module, pruning: Pruning) -> None:
    """Prune `model` in place, block by block, with SparseGPT."""
    window = pruning.pattern.window or BLOCK

    def build(name: str, inputs: dict[str, Any]) -> nn.Module:
        module, hessian = model.get_submodule(name), inputs.get("hessian")
        if hessian is None or hessian.dim() != 2 or module.weight.dim() != 2:  # a convolution's
            prune_by_scores(model, [name], pruning, {})  # patches: SparseGPT here prunes Linears only
        else:
            with torch.no_grad():
                module.weight.copy_(sparsegpt(module.weight, hessian, pruning.sparsities[name],
                                              pruning.pattern.keep, window))
        return module

    try:
        outside = quantize_blocks(model, pruning.names, pruning.calibration, build, pruning.progress)
    except (QuantizationError, CalibrationError) as error:
        raise PruningError(f"sparsegpt: {error}; prune with criterion 'wanda' instead") from None
    prune_by_scores(model, outside, pruning, {})


CRITERIA.add("sparsegpt", Criterion(prune_blocks, needs_data=True))
