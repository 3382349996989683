"""Large inputs of a MatMulNBits graph run in a second session on int8 matrix kernels: the same
weights, re-rounded once onto int8 rows, and a limit measured when the folder is saved."""

import json

import numpy as np
import pytest
import torch

import lowbit
from lowbit.runtimes import onnx_large_inputs
from lowbit.runtimes import onnxruntime as ort_runtime
from lowbit.runtimes.onnx_graph import fold_constants
from lowbit.runtimes.onnx_large_inputs import dequantized_rows, int8_graph
from lowbit.runtimes.onnx_torch import has_vnni
from tests.fixtures_models import tiny_bert
from tests.runtimes.test_onnxruntime import _batch, _kept, _reference_kernels

needs_vnni = pytest.mark.skipif(not has_vnni(), reason="the int8 session needs VNNI (saturation otherwise)")


def _graph(recipe):
    model = _reference_kernels(lowbit.quantize(tiny_bert(), recipe, progress=False))
    return model, ort_runtime.export(model, accuracy_level=4)


@pytest.mark.parametrize("recipe", ["w8", "w4-g32"])
def test_matmul_nbits_weights_decode_to_lowbits_own(recipe):
    import onnx
    from onnx import numpy_helper

    model, graph = _graph(recipe)
    proto = fold_constants(onnx.load_model_from_string(graph))  # the weights as ONNX Runtime folds them
    tensors = {tensor.name: numpy_helper.to_array(tensor) for tensor in proto.graph.initializer}
    nodes = [node for node in proto.graph.node if node.op_type == "MatMulNBits"]
    first = model.encoder.layer[0]
    assert len(nodes) == 2 * 4 + 1  # per layer: stacked qkv, output, intermediate, output; the pooler
    decoded = dequantized_rows(nodes[1], tensors)  # the first layer's attention output projection
    expected = first.attention.output.dense.dequantized_weight().numpy()
    assert np.allclose(decoded, expected, atol=1e-7, rtol=0)


@needs_vnni
@pytest.mark.parametrize("recipe", ["w8", "w4-g32"])
def test_the_int8_session_stays_close_to_lowbits_reference(recipe):
    """int8 activations per tensor and int4 groups re-rounded onto int8 rows: a token cosine of at
    least 0.995 to lowbit's float reference."""
    model, graph = _graph(recipe)
    rewritten = int8_graph(graph)
    import onnx

    ops = {node.op_type for node in onnx.load_model_from_string(rewritten).graph.node}
    assert "MatMulNBits" not in ops and "DynamicQuantizeMatMul" in ops
    batch = _batch()
    with torch.inference_mode():
        expected = _kept(model(**batch).last_hidden_state, batch)
    got = ort_runtime.OnnxRuntimeModel(ort_runtime.session(rewritten, threads=1))(**batch)
    cosine = torch.nn.functional.cosine_similarity(_kept(got.last_hidden_state, batch), expected)
    assert cosine.min() >= 0.995


@needs_vnni
def test_inputs_above_the_limit_run_in_the_int8_session():
    model, graph = _graph("w4-g32")
    opened = ort_runtime.open_model(graph, model.config, threads=1, large_inputs_above=20)
    small = {key: value[:1] for key, value in _batch().items()}  # 7 tokens
    opened(**small)
    assert opened.large_inputs.opened is None
    batch = _batch()  # 21 tokens
    large = opened(**batch)
    assert opened.large_inputs.opened is not None
    few_rows = ort_runtime.open_model(graph, model.config, threads=1)(**batch)
    cosine = torch.nn.functional.cosine_similarity(_kept(large.last_hidden_state, batch),
                                                   _kept(few_rows.last_hidden_state, batch))
    assert cosine.min() >= 0.995 and not torch.equal(large.last_hidden_state, few_rows.last_hidden_state)


def test_a_graph_computing_in_float_gets_no_int8_session():
    model = _reference_kernels(lowbit.quantize(tiny_bert(), "w4-g32", progress=False))
    assert int8_graph(ort_runtime.export(model, accuracy_level=0)) is None


def test_without_vnni_every_input_stays_in_the_models_own_session(monkeypatch):
    monkeypatch.setattr(onnx_large_inputs, "has_vnni", lambda: False)
    model, graph = _graph("w4-g32")
    assert int8_graph(graph) is None
    opened = ort_runtime.open_model(graph, model.config, threads=1, large_inputs_above=0)
    assert opened.session_for(1000) is opened.session


def test_saving_records_the_measured_limit_and_a_bad_one_is_refused(tmp_path):
    from tests.formats.attacker import edit_manifest

    quantized = lowbit.quantize(tiny_bert(), "w4-g32", progress=False)
    folder = lowbit.save(quantized, tmp_path / "m", runtime="onnxruntime", accuracy_level=4)
    entry = json.loads((folder / "lowbit.json").read_text())["onnx"]
    if has_vnni():  # tiny_bert has 32 positions: timed on 2, 4 and 8 sequences of 32 tokens
        timing, above = entry["large_input_timing"], entry["large_inputs_above"]
        assert timing["tokens"] == [64, 128, 256][: len(timing["tokens"])]
        assert len(timing["matmul_nbits_ms"]) == len(timing["int8_ms"]) == len(timing["tokens"])
        won = timing["int8_ms"][-1] < timing["matmul_nbits_ms"][-1]
        assert above == ([63, *timing["tokens"]][len(timing["tokens"]) - 1] if won else None)
    else:
        assert entry["large_inputs_above"] is None
    edit_manifest(folder, lambda manifest: manifest["onnx"].update(large_inputs_above=-1))
    with pytest.raises(lowbit.FormatError, match="large_inputs_above"):
        lowbit.load(folder)


def test_inspect_says_which_inputs_run_on_int8_kernels(tmp_path):
    from typer.testing import CliRunner

    from lowbit.cli import app
    from tests.formats.attacker import edit_manifest

    quantized = lowbit.quantize(tiny_bert(), "w4-g32", progress=False)
    folder = lowbit.save(quantized, tmp_path / "m", runtime="onnxruntime", accuracy_level=4)
    edit_manifest(folder, lambda manifest: manifest["onnx"].update(large_inputs_above=63))
    result = CliRunner().invoke(app, ["inspect", str(folder)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "inputs of more than 63 tokens: int8 DynamicQuantizeMatMul" in result.output
