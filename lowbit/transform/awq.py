"""AWQ's scaling folded into the model, block by block (lowbit.algorithms.awq has the search).

In the block-by-block walk (lowbit.transform.sequential), once a block's Hessians are gathered
and before its Linears are rounded, each pair of the block (lowbit.transform.smooth's pairs: a
norm or a Linear, and the Linears that read its output) gets the algorithm's factors s: the
producer's output channels are divided by s and the readers' columns multiplied by it (the same
float block), and the readers' Hessians become those of their divided inputs,
diag(1/s) H diag(1/s). The block's float output on its first calibration call is checked
unchanged; a mismatch is an error, never a silently different model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lowbit.errors import QuantizationError
from lowbit.nn.spec import LayerSpec
from lowbit.transform.smooth import TOLERANCE, fold_scale, smoothing_pairs

Search = Callable[[list[torch.Tensor], torch.Tensor, LayerSpec], torch.Tensor]


def scale_block(model: nn.Module, block: str, hessians: dict[str, torch.Tensor],
                specs: dict[str, LayerSpec], search: Search, run: Callable[[], torch.Tensor]) -> int:
    """Fold `search`'s factors into every pair inside `block` (a dotted module name) whose readers
    all have Hessians and specs (the Linears to scale), updating those Hessians in place; `run()`
    gives the block's output. Returns how many pairs were scaled."""
    pairs = [(source, readers) for source, readers in smoothing_pairs(model)
             if source.startswith(f"{block}.") and all(name in hessians and name in specs
                                                       for name in readers)]
    if not pairs:
        return 0
    before = run().float()
    with torch.no_grad():
        for source, readers in pairs:
            weights = [model.get_submodule(name).weight for name in readers]
            scale = search(weights, hessians[readers[0]], specs[readers[0]])
            fold_scale(model, source, readers, scale)
            inverse = 1 / scale.double()
            for name in readers:
                hessians[name] = (hessians[name].double() * inverse[:, None] * inverse[None, :]).float()
    after = run().float()
    error = float((after - before).norm() / before.norm().clamp(min=1e-12))
    if not error <= TOLERANCE:
        raise QuantizationError(f"AWQ's scaling changed {block}'s float output by {error:.2g} (relative); "
                                "this architecture does not fit its pairs")
    return len(pairs)
