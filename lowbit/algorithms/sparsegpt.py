"""SparseGPT: prune a Linear's weight column by column, each pruned weight's loss spread over the
columns not yet pruned, weighted by the inverse Hessian of the layer's inputs.

Frantar and Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot"
(ICML 2023), Algorithm 1. It is GPTQ's loop (lowbit.algorithms.gptq) with "set to zero" in place
of "round": zeroing column i moves the layer's output by w_i x_i, and the columns after it take the
Optimal Brain Surgeon update -w_i / [H⁻¹]_ii · [H⁻¹]_i,i+1:, so the kept weights make up for the
pruned ones on the calibration inputs. Which weights go is chosen as the loop reaches them
("adaptive mask selection"): in each run of `span` columns, by the pattern's rule on the OBS
saliency w² / [H⁻¹]_ii² of the weights as updated so far (a weight whose loss the rest can absorb
goes first).

As the reference: the same damping as GPTQ, columns in their own order, inputs never seen in
calibration (a zero Hessian diagonal) pruned by magnitude with the rest and left uncompensated.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lowbit.algorithms.gptq import BLOCK, inverse_hessian_factor

# (scores of a window's weights, rows x columns; sparsity) -> mask of those kept
MaskRule = Callable[[torch.Tensor, float], torch.Tensor]


def sparsegpt(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, mask_of: MaskRule,
              span: int = BLOCK) -> torch.Tensor:
    """`weight` (out, in) with `mask_of`'s share of each `span` columns of every row set to zero and
    the kept weights updated to make up for them on inputs whose Hessian is `hessian` (in, in).
    `span` is how many columns one mask is chosen for: 4 for a 2:4 pattern, a whole block of
    `BLOCK` columns for unstructured sparsity."""
    if BLOCK % span:
        raise ValueError(f"span {span} must divide the block of {BLOCK} columns")
    columns = weight.shape[1]
    work = weight.detach().double().clone()
    hessian = hessian.double().clone()
    dead = hessian.diagonal() == 0
    hessian[dead, dead] = 1.0
    factor = inverse_hessian_factor(hessian)
    diagonal = factor.diagonal()
    keep = torch.ones_like(work, dtype=torch.bool)
    for start in range(0, columns, BLOCK):
        end = min(start + BLOCK, columns)
        block, errors = work[:, start:end].clone(), torch.zeros_like(work[:, start:end])
        local = factor[start:end, start:end]
        for i in range(end - start):
            column = start + i
            if i % span == 0:
                window = slice(i, min(i + span, end - start))
                saliency = block[:, window] ** 2 / diagonal[start:end][window] ** 2
                keep[:, column : column + saliency.shape[1]] = mask_of(saliency, sparsity)
            pruned = torch.where(keep[:, column], block[:, i], 0.0)
            error = (block[:, i] - pruned) / local[i, i]
            block[:, i:] -= error[:, None] * local[i, i:][None, :]
            block[:, i] = pruned
            errors[:, i] = error
        work[:, start:end] = block
        work[:, end:] -= errors @ factor[start:end, end:]
    return (work * keep).to(weight.dtype)
