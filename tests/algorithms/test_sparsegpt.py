"""SparseGPT (lowbit.algorithms.sparsegpt, and lowbit.prune's "sparsegpt" criterion): the pattern
kept exactly, a lower output error than pruning by magnitude or Wanda at the same sparsity, plain
magnitude pruning where the inputs are uncorrelated, and the block-by-block walk on a real
transformers model."""

from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.algorithms.gptq import BLOCK
from lowbit.algorithms.sparsegpt import sparsegpt
from lowbit.errors import PruningError
from lowbit.transform.prune import PATTERNS, lowest_in_each_row
from tests.fixtures_models import tied_lm, tiny_llama, tiny_mlp, token_batches, trained_like_llama


def _layer(seed: int = 0, columns: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and correlated calibration inputs of uneven loudness per channel."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(32, columns, generator=generator)
    mixing = torch.randn(columns, columns, generator=generator) * 0.3
    loudness = torch.rand(columns, generator=generator) * 3 + 0.1
    inputs = (torch.randn(2048, columns, generator=generator) @ mixing) * loudness
    return weight, inputs


def _hessian(inputs: torch.Tensor) -> torch.Tensor:
    return 2 * inputs.T @ inputs / inputs.shape[0]


def _output_error(weight: torch.Tensor, pruned: torch.Tensor, inputs: torch.Tensor) -> float:
    return float(((inputs @ (weight - pruned).T) ** 2).mean())


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_keeps_the_pattern_and_loses_less_than_magnitude_or_wanda(pattern):
    weight, inputs = _layer()
    rule = PATTERNS.get(pattern)
    pruned = sparsegpt(weight, _hessian(inputs), 0.5, rule.keep, rule.window or BLOCK)
    zeros = pruned == 0
    if pattern == "2:4":
        assert bool((zeros.reshape(-1, 4).sum(dim=1) == 2).all())
    else:  # half of each row, in each block of columns
        assert bool((zeros.reshape(32, -1, BLOCK).sum(dim=2) == BLOCK // 2).all())
    magnitude = weight * rule.keep(weight.abs(), 0.5)
    wanda = weight * rule.keep(weight.abs() * inputs.norm(dim=0), 0.5)
    error = _output_error(weight, pruned, inputs)
    assert error < 0.8 * _output_error(weight, wanda, inputs) < 0.8 * _output_error(weight, magnitude, inputs)
    assert not torch.equal(pruned[~zeros], weight[~zeros])  # the kept weights made up for the rest


def test_on_uncorrelated_inputs_of_equal_loudness_it_is_magnitude_pruning():
    weight, _ = _layer()
    pruned = sparsegpt(weight, 2 * torch.eye(weight.shape[1]), 0.5, lowest_in_each_row)
    blocks = weight.split(BLOCK, dim=1)
    expected = torch.cat([block * lowest_in_each_row(block.abs(), 0.5) for block in blocks], dim=1)
    torch.testing.assert_close(pruned, expected)


def test_inputs_never_seen_in_calibration_do_not_break_it():
    weight, inputs = _layer()
    inputs[:, :9] = 0
    pruned = sparsegpt(weight, _hessian(inputs), 0.5, lowest_in_each_row)
    assert torch.isfinite(pruned).all()
    assert float((pruned == 0).float().mean()) == 0.5


def test_pruning_a_llama_block_by_block_is_closer_to_float_than_wanda():
    model = trained_like_llama()
    table = model.model.embed_tokens.weight  # correlated token states, as a trained model's are
    table.data = torch.randn(table.shape[0], 12) @ torch.randn(12, table.shape[1]) + 0.1 * table.data
    calibration, [held_out] = token_batches(model, 8, 0), token_batches(model, 1, 1)
    with torch.inference_mode():
        reference = model(**held_out).logits
    errors = {}
    for criterion in ("wanda", "sparsegpt"):  # the blocks' Linears: where the two differ
        pruned = lowbit.prune(model, 0.5, calibration=calibration, criterion=criterion, progress=False,
                              skip=["model.embed_tokens", "lm_head"])
        with torch.inference_mode():
            errors[criterion] = float(((pruned(**held_out).logits - reference) ** 2).mean())
        assert pruned.lowbit_pruning["criterion"] == criterion
        assert set(pruned.lowbit_pruning["modules"].values()) == {0.5}
    assert errors["sparsegpt"] < 0.8 * errors["wanda"], errors
    torch.testing.assert_close(model(**held_out).logits, reference)  # the model itself untouched


def test_sparsegpt_needs_calibration_and_blocks():
    with pytest.raises(PruningError, match="calibration"):
        lowbit.prune(tiny_llama(), criterion="sparsegpt")
    with pytest.raises(PruningError, match="wanda"):  # no nn.ModuleList or nn.Sequential of blocks
        lowbit.prune(tied_lm(), calibration=[torch.randint(0, 100, (4, 8))], criterion="sparsegpt",
                     progress=False)
    with pytest.raises(PruningError, match="unknown pruning criterion"):
        lowbit.prune(tiny_mlp(), criterion="obs")


def test_a_plain_stack_of_layers_is_its_own_list_of_blocks():
    """An nn.Sequential MLP walks layer by layer: each Linear pruned by SparseGPT to the asked
    sparsity, closer to float on held-out inputs than magnitude pruning."""
    model, generator = tiny_mlp().eval(), torch.Generator().manual_seed(4)
    mixing = torch.randn(64, 64, generator=generator)
    calibration = [torch.randn(32, 64, generator=generator) @ mixing for _ in range(8)]
    held_out = torch.randn(64, 64, generator=generator) @ mixing
    errors = {}
    for criterion in ("magnitude", "sparsegpt"):
        pruned = lowbit.prune(model, 0.5, criterion=criterion, calibration=calibration, progress=False)
        for name in ("0", "2"):
            zeros = float((pruned.get_submodule(name).weight == 0).float().mean())
            assert zeros == pytest.approx(0.5, abs=0.01)
        with torch.no_grad():
            errors[criterion] = float(((pruned(held_out) - model(held_out)) ** 2).mean())
    assert errors["sparsegpt"] < 0.85 * errors["magnitude"]
