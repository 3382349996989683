"""bench.qat's references for EfficientNet-Lite0's agreement: near ties counted, weights rounded to a
float type in a copy."""

import math

import torch

from bench.qat import NEAR_TIE, near_ties, rounded_weights


def test_near_ties_counts_rows_whose_top_class_is_barely_ahead():
    barely, clearly = math.log(NEAR_TIE) / 2, math.log(NEAR_TIE) * 2
    logits = torch.tensor([[barely, 0.0, -5.0], [0.0, clearly, -5.0], [0.0, -5.0, barely]])
    assert near_ties(logits) == 2


def test_rounded_weights_rounds_a_copy_and_leaves_the_model_alone():
    model = torch.nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.copy_(torch.tensor(1.0 + 2.0**-12).expand(3, 4))
    rounded = rounded_weights(model, torch.bfloat16)
    assert rounded.weight.dtype == torch.float32
    assert torch.equal(rounded.weight, torch.ones(3, 4))
    assert torch.equal(model.weight, torch.full((3, 4), 1.0 + 2.0**-12))
