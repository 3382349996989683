"""AWQ: activation-aware weight quantization. Scale up the weight columns that meet large
activations before rounding, and divide those activations by the same factors, so the channels
that matter most get the finest steps while the float model stays exactly the same.

Lin et al., "AWQ: Activation-aware Weight Quantization for On-Device LLM Compression and
Acceleration" (MLSys 2024), section 3.2. For the Linears that read one tensor X (a block's
query, key and value projections; gate and up; down), column j of every weight is multiplied by

    s_j = a_j^α / sqrt(max(a^α) · min(a^α)),

with a_j the size of input channel j, and the module producing X has its output channel j
divided by s_j (lowbit.transform.awq folds it into a norm's weight or a Linear's rows). α, from
`GRID`, is the one with the least output error of the rounded Linears on the calibration inputs:

    Σ_Linears ||X Wᵀ − (X / s) Q(W · s)ᵀ||² / n = Σ tr(E H Eᵀ) / 2,   E = W − Q(W · s) / s,

where H = 2 XᵀX / n is the Hessian the block-by-block walk gathers (lowbit.transform.sequential);
a_j is the channel's root mean square, sqrt(H_jj / 2) (the paper uses the mean |x_j|). α = 0
(s = 1) is round-to-nearest, so the search cannot do worse on these inputs. (The reference's "duo
scaling", a_j^α / w_j^(1−α) with the weights' side as well, was tried on SmolLM2-135M: it chose
lower per-Linear errors and gave a worse perplexity, +16.9% against +15.8%.) Each scaled weight is
then rounded to nearest on the grid whose every group's range is shrunk by the factor with the
least error weighted by its columns' H_jj (the paper's clipping search; lowbit.algorithms.gptq's
`searched_grid`).
"""

from __future__ import annotations

import torch

from lowbit.algorithms import ALGORITHMS, Algorithm
from lowbit.algorithms.gptq import gptq, searched_grid
from lowbit.core import QuantizedTensor
from lowbit.errors import QuantizationError
from lowbit.nn.qweight import round_to_nearest
from lowbit.nn.spec import LayerSpec

GRID = torch.linspace(0.0, 0.95, 20)  # the exponents α tried, 0 (round-to-nearest) first


def _output_error(weights: list[torch.Tensor], scale: torch.Tensor, spec: LayerSpec,
                  hessian: torch.Tensor) -> float:
    """Σ tr(E H Eᵀ) over `weights`, E = W − Q(W · scale) / scale."""
    total = 0.0
    for weight in weights:
        rounded = round_to_nearest(weight * scale, spec).dequantize() / scale
        error = weight - rounded
        total += float(((error @ hessian) * error).sum())
    return total


def input_scale(weights: list[torch.Tensor], hessian: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
    """AWQ's per-input-channel factors s for Linears (out_i, in) that read the inputs whose Hessian
    is `hessian` (in, in): the weights' columns are to be multiplied by s, the inputs divided."""
    if not bool(torch.isfinite(hessian).all()):
        raise QuantizationError("the calibration inputs give a Hessian with NaN or Inf values")
    hessian = hessian.float()
    weights = [weight.detach().float() for weight in weights]
    size = (hessian.diagonal().clamp_min(0) / 2).sqrt().clamp_min(1e-8)
    best, best_error = torch.ones_like(size), None
    for alpha in GRID:
        powered = size ** alpha
        scale = powered / (powered.max() * powered.min()).sqrt()
        error = _output_error(weights, scale, spec, hessian)
        if best_error is None or error < best_error:
            best, best_error = scale, error
    return best


def awq(weight: torch.Tensor, spec: LayerSpec, hessian: torch.Tensor) -> QuantizedTensor:
    """`weight` (already scaled by `input_scale`, its inputs' Hessian `hessian` with it) rounded to
    nearest on the group ranges with the least input-weighted error."""
    importance = hessian.diagonal().float().clamp_min(0).reshape(1, -1)
    return searched_grid(weight.float(), spec, importance)


ALGORITHMS.add("awq", Algorithm(awq, needs_hessian=True, scales_inputs=input_scale))
# AWQ's scaling, then GPTQ's rounding against the scaled inputs' Hessian (the two compose: AWQ
# moves precision to the salient channels, GPTQ spreads each column's rounding error)
ALGORITHMS.add("awq-gptq", Algorithm(gptq, needs_hessian=True, scales_inputs=input_scale))
