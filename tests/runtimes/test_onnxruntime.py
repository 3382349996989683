"""The ONNX Runtime runtime: lowbit's integers in ONNX Runtime's kernels give lowbit's outputs."""

import json
import sys

import numpy as np
import pytest
import torch

import lowbit
from lowbit.errors import ChecksumError, LowbitError
from lowbit.nn.qlinear import QLinear
from lowbit.runtimes import onnxruntime as ort_runtime
from lowbit.runtimes.onnx_modules import ExportError
from tests.fixtures_models import tiny_bert, tiny_mlp


def _reference_kernels(model):
    """The exact dequantize-then-matmul kernel in every weight-only Linear: what MatMulNBits at
    accuracy level 0 computes."""
    for module in model.modules():
        if isinstance(module, QLinear) and module.spec.scheme == "weight_only":
            module.spec = module.spec.with_kernels({"all": "reference"})
            module.kernel_cache.clear()
    return model


def _batch(vocabulary=64):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocabulary, (3, 7), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # a padded row
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def _run(model, batch, accuracy_level=0):
    session = ort_runtime.session(ort_runtime.export(model, accuracy_level=accuracy_level), threads=1)
    wrapped = ort_runtime.OnnxRuntimeModel(session)
    return wrapped(**batch)


def _kept(hidden, batch):
    return hidden[batch["attention_mask"].bool()]


@pytest.mark.parametrize("recipe", [None, "w8", "w4-g32", "fp16", "q4_0", "q5_0", "q8_0", "q4_1"])
def test_the_graph_computes_what_lowbit_computes(recipe):
    model = tiny_bert()
    if recipe is not None:
        model = _reference_kernels(lowbit.quantize(model, recipe, progress=False))
    batch = _batch()
    with torch.inference_mode():
        expected = model(**batch)
    got = _run(model, batch)
    assert torch.allclose(_kept(got.last_hidden_state, batch), _kept(expected.last_hidden_state, batch),
                          atol=2e-5, rtol=1e-4)
    assert torch.allclose(got.pooler_output, expected.pooler_output, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("recipe, accuracy_level", [("w8a8-dynamic", 0), ("w8", 4), ("w4-g32", 4)])
def test_activation_quantizing_kernels_stay_close(recipe, accuracy_level):
    """Kernels that quantize activations (DynamicQuantizeMatMul, MatMulNBits at level 4) cannot
    equal lowbit's float reference, but stay within a token cosine of 0.995 of it."""
    model = _reference_kernels(lowbit.quantize(tiny_bert(), recipe, progress=False))
    batch = _batch()
    with torch.inference_mode():
        expected = _kept(model(**batch).last_hidden_state, batch)
    got = _kept(_run(model, batch, accuracy_level).last_hidden_state, batch)
    assert torch.nn.functional.cosine_similarity(got, expected).min() >= 0.995


def test_qattention_equals_matmul_split_and_multi_head_attention():
    """w8a8-dynamic attention runs in QAttention: bit for bit what DynamicQuantizeMatMul, Split
    and MultiHeadAttention give, padded positions masked alike."""
    from onnx import TensorProto

    from lowbit.runtimes.onnx_graph import MICROSOFT, Graph
    from lowbit.runtimes.onnx_modules import emit_linear, emit_quantized_attention, stacked

    attention = lowbit.quantize(tiny_bert(), "w8a8-dynamic", progress=False).encoder.layer[0].attention.self
    projection = stacked([attention.query, attention.key, attention.value])
    graph = Graph("attention")
    x = graph.add_input("x", TensorProto.FLOAT, ["batch", "sequence", 32])
    mask = graph.add_input("mask", TensorProto.INT32, ["batch", "sequence"])
    graph.add_output(emit_quantized_attention(graph, projection, x, mask, heads=2), "fused",
                     TensorProto.FLOAT, ["batch", "sequence", 32])
    qkv = emit_linear(graph, projection, x, "qkv", "dynamic_quantize_matmul")
    widths = graph.constant("widths", np.array([32] * 3, np.int64))
    parts = graph.node("Split", [qkv, widths], outputs=3, axis=-1)
    graph.add_output(graph.node("MultiHeadAttention", [*parts, "", mask], domain=MICROSOFT, num_heads=2),
                     "split", TensorProto.FLOAT, ["batch", "sequence", 32])
    session = ort_runtime.session(graph.model("test").SerializeToString(), threads=1)
    feeds = {"x": np.random.default_rng(0).standard_normal((3, 7, 32)).astype(np.float32),
             "mask": _batch()["attention_mask"].numpy().astype(np.int32)}
    fused, split = session.run(None, feeds)
    kept = feeds["mask"].astype(bool)
    assert np.array_equal(fused[kept], split[kept])


def test_saved_onnx_folder_loads_into_onnxruntime_and_is_checksummed(tmp_path):
    quantized = lowbit.quantize(tiny_bert(), "w8", progress=False)
    folder = lowbit.save(quantized, tmp_path / "m", runtime="onnxruntime")
    manifest = json.loads((folder / "lowbit.json").read_text())
    assert manifest["runtime"] == "onnxruntime" and "model.onnx" in manifest["files"]
    loaded = lowbit.load(folder)
    assert isinstance(loaded, ort_runtime.OnnxRuntimeModel)
    batch = _batch()
    with torch.inference_mode():
        expected = _reference_kernels(quantized)(**batch).last_hidden_state
    assert torch.allclose(_kept(loaded(**batch).last_hidden_state, batch), _kept(expected, batch),
                          atol=2e-5, rtol=1e-4)
    data = bytearray((folder / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ChecksumError):
        lowbit.load(folder)


def test_a_plain_model_without_an_example_input_is_refused_and_nothing_is_written(tmp_path):
    quantized = lowbit.quantize(tiny_mlp(), "w8", progress=False)
    with pytest.raises(ExportError, match="Sequential needs an example input"):
        lowbit.save(quantized, tmp_path / "m", runtime="onnxruntime")
    assert not (tmp_path / "m").exists()


def test_without_onnxruntime_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what `import onnxruntime` meets when absent
    with pytest.raises(LowbitError, match=r"lowbit\[onnx\]"):
        ort_runtime.export(tiny_bert())


def test_minilm_w8_in_onnxruntime_keeps_lowbits_quality(minilm, wiki_sentences):
    model, tokenizer, _ = minilm
    quantized = _reference_kernels(lowbit.quantize(model, "w8", progress=False))
    batch = dict(tokenizer(wiki_sentences[:16], padding=True, truncation=True, max_length=64,
                           return_tensors="pt"))
    with torch.inference_mode():
        original = model(**batch).last_hidden_state
        expected = quantized(**batch).last_hidden_state
    got = _run(quantized, batch).last_hidden_state
    assert float((_kept(got, batch) - _kept(expected, batch)).abs().max()) < 1e-4

    def pooled(hidden):
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert float((pooled(got) * pooled(original)).sum(-1).mean()) >= 0.999
    assert np.isfinite(got.numpy()).all()


@pytest.mark.parametrize("asked", [{"runtime": "auto"}, {}], ids=["auto", "default"])
def test_auto_times_both_runtimes_and_records_why(tmp_path, asked):
    quantized = lowbit.quantize(tiny_bert(), "w4-g32", progress=False)
    folder = lowbit.save(quantized, tmp_path / "m", **asked)
    manifest = json.loads((folder / "lowbit.json").read_text())
    choice = manifest["runtime_choice"]
    assert manifest["runtime"] == choice["chosen"] in ("eager", "onnxruntime")
    assert set(choice["median_ms"]) == {"eager", "onnxruntime"}
    assert all(ms > 0 for times in choice["median_ms"].values() for ms in times.values())
    assert ("model.onnx" in manifest["files"]) == (manifest["runtime"] == "onnxruntime")


def test_auto_keeps_torch_for_a_model_it_cannot_export(tmp_path, recwarn):
    folder = lowbit.save(lowbit.quantize(tiny_mlp(), "w8", progress=False), tmp_path / "m", runtime="auto")
    manifest = json.loads((folder / "lowbit.json").read_text())
    assert manifest["runtime"] == "eager" and "no example input" in manifest["runtime_choice"]["reason"]
    assert not [warning for warning in recwarn if issubclass(warning.category, lowbit.LowbitWarning)]


def test_an_onnx_folder_also_loads_in_torch(tmp_path):
    quantized = lowbit.quantize(tiny_bert(), "w8", progress=False)
    folder = lowbit.save(quantized, tmp_path / "m", runtime="onnxruntime")
    eager = lowbit.load(folder, runtime="torch")
    assert not isinstance(eager, ort_runtime.OnnxRuntimeModel)
    assert any(isinstance(module, QLinear) for module in eager.modules())
    with pytest.raises(LowbitError, match="unknown runtime"):
        lowbit.load(folder, runtime="fast")


def test_export_command_writes_one_onnx_file_atomically(tmp_path):
    from typer.testing import CliRunner

    from lowbit.cli import app

    folder = lowbit.save(lowbit.quantize(tiny_bert(), "w8", progress=False), tmp_path / "m")
    runner = CliRunner()
    result = runner.invoke(app, ["export", str(folder), "--out", str(tmp_path / "m.onnx")])
    assert result.exit_code == 0, result.output
    session = ort_runtime.session((tmp_path / "m.onnx").read_bytes(), threads=1)
    assert [value.name for value in session.get_outputs()] == ["last_hidden_state", "pooler_output"]
    again = runner.invoke(app, ["export", str(folder), "--out", str(tmp_path / "m.onnx")])
    assert again.exit_code == 2 and "already exists" in again.output
    plain = lowbit.save(lowbit.quantize(tiny_mlp(), "w8", progress=False), tmp_path / "plain")
    refused = runner.invoke(app, ["export", str(plain), "--out", str(tmp_path / "p.onnx"), ])
    assert refused.exit_code == 2 and not (tmp_path / "p.onnx").exists()


def test_inspect_shows_the_runtime_and_the_onnx_op_of_each_layer(tmp_path):
    from typer.testing import CliRunner

    from lowbit.cli import app

    folder = lowbit.save(lowbit.quantize(tiny_bert(), "w8a8-dynamic", progress=False), tmp_path / "m",
                         runtime="onnxruntime")
    result = CliRunner().invoke(app, ["inspect", str(folder)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "DynamicQuantizeMatMul" in result.output and "GatherBlockQuantized" in result.output
    assert "QAttention" in result.output  # query, key and value of w8a8-dynamic layers
    assert "runtime: ONNX Runtime (model.onnx, accuracy level 0)" in result.output


def test_quantize_for_onnxruntime_refuses_a_model_it_cannot_export_with_exit_2(tmp_path):
    from typer.testing import CliRunner

    from lowbit.cli import app

    result = CliRunner().invoke(app, ["quantize", "tests.fixtures_models:tiny_mlp", "--recipe", "w8",
                                      "--runtime", "onnxruntime", "--out", str(tmp_path / "m")],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "needs an example input" in result.output
    assert not (tmp_path / "m").exists()


def _resigned(folder, change):
    """Apply `change` to the folder's ONNX model, then recompute every checksum as an attacker would."""
    import onnx

    from tests.formats.attacker import resign_folder

    model = onnx.load(str(folder / "model.onnx"))
    change(model)
    (folder / "model.onnx").write_bytes(model.SerializeToString())
    resign_folder(folder)


def test_an_onnx_graph_cannot_read_a_file_outside_its_folder(tmp_path, monkeypatch):
    import onnx

    quantized = lowbit.quantize(tiny_bert(), "w8", progress=False)
    folder = lowbit.save(quantized, tmp_path / "m", runtime="onnxruntime")
    (tmp_path / "secret.bin").write_bytes(bytes(4096))
    monkeypatch.chdir(tmp_path)  # where ONNX Runtime resolves external data of a model read from bytes

    def point_outside(model):
        tensor = next(t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
        tensor.ClearField("raw_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
        tensor.external_data.add(key="location", value="secret.bin")
    _resigned(folder, point_outside)
    with pytest.raises(lowbit.FormatError, match="no checksummed secret.bin"):
        lowbit.load(folder)


def test_an_onnx_graph_with_a_foreign_op_domain_is_refused(tmp_path):
    quantized = lowbit.quantize(tiny_bert(), "w8", progress=False)
    folder = lowbit.save(quantized, tmp_path / "m", runtime="onnxruntime")

    def foreign(model):
        model.graph.node[0].domain = "evil.custom"
        model.opset_import.add(domain="evil.custom", version=1)
    _resigned(folder, foreign)
    with pytest.raises(lowbit.FormatError, match="op domains"):
        lowbit.load(folder)


def test_compare_measures_an_onnx_folders_layers_in_pytorch(minilm, wiki_sentences, tmp_path):
    from lowbit.report.markdown import render_markdown

    model, _, path = minilm
    folder = lowbit.save(lowbit.quantize(model, "w8", progress=False), tmp_path / "m", runtime="onnxruntime",
                         accuracy_level=4)
    comparison = lowbit.compare(str(path), str(folder), wiki_sentences[:8], samples=8, batch_sizes=(1,),
                                runs=3, memory=False, progress=False)
    # 6 layers x (query, key, value, output, intermediate, output), the pooler, three embeddings
    assert len(comparison.layers) == 40
    kernels = {layer["name"]: layer["kernel"] for layer in comparison.layers}
    assert kernels["encoder.layer.0.attention.self.query"] == "ONNX Runtime MatMulNBits"
    assert kernels["embeddings.word_embeddings"] == "ONNX Runtime GatherBlockQuantized"
    assert all(12 < layer["sqnr_db"] < 80 for layer in comparison.layers)
    assert "measured in PyTorch on the" in render_markdown(comparison)


@pytest.mark.parametrize("recipe", ["w4-g32", "w8"])
def test_a_shorter_activation_block_keeps_the_weights_and_tightens_int8_activations(recipe):
    """Blocks of 16 repeat each group's scale and zero point: at accuracy level 0 the output is the
    same; at level 4 activations are quantized per 16 inputs, closer to the exact output."""
    quantized = _reference_kernels(lowbit.quantize(tiny_bert(), recipe, progress=False))
    batch = _batch()
    with torch.inference_mode():
        expected = quantized(**batch).last_hidden_state

    def run(level, block):
        graph = ort_runtime.export(quantized, accuracy_level=level, activation_block=block)
        wrapped = ort_runtime.OnnxRuntimeModel(ort_runtime.session(graph, threads=1))
        return _kept(wrapped(**batch).last_hidden_state, batch)

    kept = _kept(expected, batch)
    assert float((run(0, 16) - kept).abs().max()) < 1e-4
    assert float((run(4, 16) - kept).abs().max()) < float((run(4, None) - kept).abs().max())
    with pytest.raises(ExportError, match="activation_block"):
        ort_runtime.export(quantized, activation_block=24)


def test_the_cli_takes_an_activation_block_and_inspect_shows_it(tmp_path):
    from typer.testing import CliRunner

    from lowbit.cli import app

    runner = CliRunner()
    arguments = ["quantize", "tests.fixtures_models:tiny_bert", "--recipe", "w8", "--runtime", "onnxruntime",
                 "--accuracy-level", "4", "--out", str(tmp_path / "m")]
    refused = runner.invoke(app, [*arguments, "--activation-block", "24"], env={"COLUMNS": "200"})
    assert refused.exit_code == 2 and not (tmp_path / "m").exists()
    result = runner.invoke(app, [*arguments, "--activation-block", "16"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    shown = runner.invoke(app, ["inspect", str(tmp_path / "m")], env={"COLUMNS": "200"})
    assert "accuracy level 4, blocks of at most 16" in shown.output
