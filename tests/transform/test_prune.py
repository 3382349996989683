"""Pruning (lowbit.prune): the patterns keep what they promise, zeros survive distillation and
quantization, a pruned model saves smaller and reloads to the same outputs, and bad input is refused
with the model untouched."""

import copy
import json

import pytest
import torch
from torch import nn

import lowbit
from lowbit.errors import PruningError, QuantizationError
from lowbit.transform.quantize import quantized_modules
from tests.fixtures_models import tiny_cnn, tiny_mlp


def _weights(model):
    return {name: module.weight.detach().clone() for name, module in model.named_modules()
            if isinstance(module, nn.Linear | nn.Conv2d | nn.Embedding)}


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_unstructured_pruning_zeroes_the_smallest_share_of_each_row(sparsity):
    model = tiny_mlp()
    before = _weights(model)
    pruned = lowbit.prune(model, sparsity)
    for name, weight in _weights(pruned).items():
        for row, original in zip(weight, before[name], strict=True):
            zeros = row == 0
            assert int(zeros.sum()) == round(sparsity * row.numel())
            if zeros.any():  # every kept value is at least as large as every pruned one
                assert original[~zeros].abs().min() >= original[zeros].abs().max()
            assert torch.equal(row[~zeros], original[~zeros])
    assert pruned.lowbit_pruning["pattern"] == "unstructured"
    assert pruned.lowbit_pruning["criterion"] == "magnitude"
    assert pruned.lowbit_pruning["modules"] == {name: round(float((weight == 0).float().mean()), 4)
                                                for name, weight in _weights(pruned).items()}
    assert all(torch.equal(before[name], weight) for name, weight in _weights(model).items())  # untouched


def test_with_calibration_a_small_weight_on_a_loud_input_is_kept():
    layer = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.125, 1.0, 0.875, 0.25]]))
    loud_first = torch.tensor([[100.0, 1.0, 1.0, 1.0]])  # Wanda: |W| x ||X|| = 12.5, 1, 0.875, 0.25
    assert lowbit.prune(layer, 0.5).weight.tolist() == [[0.0, 1.0, 0.875, 0.0]]  # magnitude
    pruned = lowbit.prune(layer, 0.5, calibration=[loud_first])
    assert pruned.weight.tolist() == [[0.125, 1.0, 0.0, 0.0]]
    assert pruned.lowbit_pruning["criterion"] == "wanda"


def test_overrides_prune_the_modules_their_globs_match_to_their_own_share():
    pruned = lowbit.prune(tiny_mlp(), 0.5, overrides={"2": 0.25, "*": 0.75})  # the first match wins
    assert pruned.lowbit_pruning["modules"] == {"0": 0.75, "2": 0.25}
    assert pruned.lowbit_pruning["overrides"] == {"2": 0.25, "*": 0.75}


def test_two_of_four_keeps_the_two_largest_of_every_four_inputs():
    model = tiny_mlp()
    before = _weights(model)
    for name, weight in _weights(lowbit.prune(model, pattern="2:4")).items():
        groups, original = weight.reshape(-1, 4), before[name].reshape(-1, 4)
        assert bool(((groups == 0).sum(dim=1) == 2).all())
        kept = original.abs().topk(2, dim=1).indices
        assert torch.equal(groups.gather(1, kept), original.gather(1, kept))


def test_convolutions_prune_along_their_flattened_inputs():
    pruned = lowbit.prune(tiny_cnn(), 0.5, skip=["6"])
    for name, inputs in (("0", 27), ("2", 9)):  # 3 x 3 x 3, and 1 x 3 x 3 (one channel per group)
        rows = pruned.get_submodule(name).weight.reshape(-1, inputs)
        assert bool(((rows == 0).sum(dim=1) == round(0.5 * inputs)).all())
    assert "6" not in pruned.lowbit_pruning["modules"]
    assert int((pruned.get_submodule("6").weight == 0).sum()) == 0  # skipped


@pytest.mark.parametrize("recipe", [None, "w8"])
def test_distillation_keeps_the_pruned_zeros(recipe, monkeypatch):
    monkeypatch.setenv("LOWBIT_KERNEL", "reference")
    teacher = tiny_mlp().eval()
    pruned = lowbit.prune(teacher, 0.5)
    student = pruned if recipe is None else lowbit.qat.prepare(pruned, recipe, progress=False)
    batches = [torch.randn(8, 64, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    zeros = {name: weight == 0 for name, weight in _weights(pruned).items()}
    result = lowbit.distill(student, teacher, batches, steps=20, lr=1e-2, loss="mse", progress=False)
    assert result.loss == "mse" and result.curve[-1][2] < result.curve[0][2]  # it trained
    weights = _weights(student)
    for name, mask in zeros.items():
        weight = weights[name if recipe is None else f"{name}.float_module"]
        assert bool((weight[mask] == 0).all()) and bool((weight[~mask] != 0).any())
    if recipe is not None:
        converted = lowbit.qat.convert(student, progress=False)
        for name, module in quantized_modules(converted).items():
            assert bool((module.quantized_weight().data[zeros[name]] == 0).all())
        assert converted.lowbit_pruning == pruned.lowbit_pruning


def test_a_pruned_model_saves_as_bitmask_and_kept_values_and_reloads_the_same(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_KERNEL", "reference")
    model, batch = tiny_mlp().eval(), torch.randn(4, 64)
    dense = lowbit.quantize(model, "w8", progress=False)
    sparse = lowbit.quantize(lowbit.prune(model, 0.5), "w8", progress=False)
    lowbit.save(dense, tmp_path / "dense", runtime="torch")
    lowbit.save(sparse, tmp_path / "sparse", runtime="torch")
    manifest = json.loads((tmp_path / "sparse" / "lowbit.json").read_text())
    assert set(manifest["sparse"]) == {"0.weight"}  # 2.weight (1,280 values) is too small to gain
    assert manifest["sparse"]["0.weight"] == {"dtype": "I8", "shape": [128, 64], "kept": 4096}
    assert manifest["pruning"]["pattern"] == "unstructured" and manifest["pruning"]["sparsity"] == 0.5
    stored = {name: (tmp_path / name / "model.lowbit.safetensors").stat().st_size
              for name in ("dense", "sparse")}
    assert stored["sparse"] < 0.8 * stored["dense"]
    loaded = lowbit.load(tmp_path / "sparse", skeleton=tiny_mlp())
    with torch.no_grad():
        assert torch.equal(loaded(batch), sparse(batch))
    assert loaded.lowbit_pruning == sparse.lowbit_pruning
    assert json.loads((tmp_path / "dense" / "lowbit.json").read_text())["sparse"] == {}


def test_a_pruned_model_saved_for_onnxruntime_is_stored_whole_and_says_so(tmp_path):
    sparse = lowbit.quantize(lowbit.prune(tiny_mlp(), 0.5), "w8", progress=False)
    sparse.lowbit_example_input = torch.randn(2, 64)  # what the ONNX export traces
    with pytest.warns(lowbit.LowbitWarning, match="stored whole"):
        lowbit.save(sparse, tmp_path / "ort", runtime="onnxruntime")
    assert json.loads((tmp_path / "ort" / "lowbit.json").read_text())["sparse"] == {}


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, float("nan"), "half", True])
def test_a_sparsity_outside_zero_to_one_is_refused(sparsity):
    model = tiny_mlp()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(PruningError, match=r"\[0, 1\)"):
        lowbit.prune(model, sparsity, inplace=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_two_of_four_on_rows_not_divisible_by_four_is_refused_naming_the_module():
    model = tiny_cnn()  # the first convolution's rows are 3 x 3 x 3 = 27 inputs
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(PruningError, match=r"'0' has 27"):
        lowbit.prune(model, pattern="2:4", inplace=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not hasattr(model, "lowbit_pruning")


@pytest.mark.parametrize(("call", "error", "message"), [
    (lambda m: lowbit.prune(m, pattern="4:8"), PruningError, "unknown pruning pattern"),
    (lambda m: lowbit.prune(m, 0.3, pattern="2:4"), PruningError, "exactly half"),
    (lambda m: lowbit.prune(m, skip=["*"]), PruningError, "nothing to prune"),
    (lambda m: lowbit.prune(lowbit.quantize(m, "w8", progress=False)), QuantizationError, "integer"),
    (lambda m: lowbit.prune("model.pt"), PruningError, "torch.nn.Module"),
    (lambda m: lowbit.prune(m, pattern="2:4", overrides={"0": 0.7}), PruningError, "no overrides"),
    (lambda m: lowbit.prune(m, overrides={"0": 1.0}), PruningError, r"got 1.0 for '0'"),
    (lambda m: lowbit.prune(m, criterion="wanda"), PruningError, "calibration batches"),
    (lambda m: lowbit.prune(m, calibration=[]), PruningError, "calibration batches are empty"),
])
def test_other_bad_pruning_requests_are_refused(call, error, message):
    with pytest.raises(error, match=message):
        call(tiny_mlp())
