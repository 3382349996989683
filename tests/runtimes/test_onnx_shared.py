"""An ONNX Runtime folder keeps each weight once: model.onnx refers to lowbit's tensor file."""

import json

import numpy as np
import pytest
import torch

import lowbit
from lowbit.errors import ChecksumError, FormatError
from lowbit.formats.lowbit_format import tensor_regions
from lowbit.runtimes import onnxruntime as ort_runtime
from lowbit.runtimes.onnx_shared import StoredBytes, inline_stored, share_stored


def _bytes(folder):
    return sum(file.stat().st_size for file in folder.iterdir())


@pytest.mark.parametrize("recipe", ["w8a8-dynamic", "w8", "w4-g32"])
def test_an_onnx_folder_is_the_size_of_a_torch_one(minilm, tmp_path, recipe):
    """Every weight the graph reads is in the tensor file once: model.onnx holds the graph and
    what lowbit does not store as the kernel takes it (repeated scales, packed zero points)."""
    model, _, _ = minilm
    quantized = lowbit.quantize(model, recipe, progress=False)
    torch_folder = lowbit.save(quantized, tmp_path / "torch", runtime="torch")
    onnx_folder = lowbit.save(quantized, tmp_path / "onnx", runtime="onnxruntime")
    assert _bytes(onnx_folder) < 1.05 * _bytes(torch_folder)
    tensor_file = (onnx_folder / "model.lowbit.safetensors").stat().st_size
    assert (onnx_folder / "model.onnx").stat().st_size < 0.05 * tensor_file


def test_inlining_the_shared_graph_gives_back_the_exported_one(minilm, tmp_path):
    model, _, _ = minilm
    quantized = lowbit.quantize(model, "w4-g32", progress=False)
    folder = lowbit.save(quantized, tmp_path / "m", runtime="torch")
    graph = ort_runtime.export(quantized)
    regions = [StoredBytes(*region) for region in tensor_regions(folder)]
    shared = share_stored(graph, regions, lambda name: (folder / name).read_bytes())
    assert len(shared) < len(graph) / 10
    assert inline_stored(shared, lambda name: (folder / name).read_bytes(), "m") == graph


def test_plain_onnxruntime_reads_the_weights_from_the_tensor_file(minilm, tmp_path):
    import onnxruntime

    model, tokenizer, _ = minilm
    folder = lowbit.save(lowbit.quantize(model, "w8a8-dynamic", progress=False), tmp_path / "m",
                         runtime="onnxruntime")
    batch = dict(tokenizer(["One copy of the weights.", "A second sentence, a little longer."],
                           padding=True, return_tensors="pt"))
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.add_session_config_entry("optimization.disable_specified_optimizers", "SkipLayerNormFusion")
    plain = onnxruntime.InferenceSession(str(folder / "model.onnx"), options,
                                         providers=["CPUExecutionProvider"])
    got = plain.run(["last_hidden_state"], {name: value.numpy() for name, value in batch.items()})[0]
    with torch.inference_mode():
        expected = lowbit.load(folder)(**batch).last_hidden_state.numpy()
    kept = batch["attention_mask"].bool().numpy()
    assert np.allclose(got[kept], expected[kept], atol=1e-5)


def test_a_changed_tensor_file_is_caught_before_onnxruntime_reads_it(tmp_path):
    from tests.fixtures_models import tiny_bert

    quantized = lowbit.quantize(tiny_bert(), "w8", progress=False)
    folder = lowbit.save(quantized, tmp_path / "m", runtime="onnxruntime")
    tensors = folder / "model.lowbit.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 0xFF
    tensors.write_bytes(bytes(data))
    with pytest.raises(ChecksumError):
        lowbit.load(folder)


@pytest.mark.parametrize("location", ["../secret.bin", "sub/model.lowbit.safetensors", "lowbit.json.missing"])
def test_a_reference_to_anything_but_a_listed_file_is_refused(tmp_path, location):
    import onnx

    from tests.fixtures_models import tiny_bert
    from tests.formats.attacker import resign_folder

    quantized = lowbit.quantize(tiny_bert(), "w8", progress=False)
    folder = lowbit.save(quantized, tmp_path / "m", runtime="onnxruntime")
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value=location)
    (folder / "model.onnx").write_bytes(model.SerializeToString())
    resign_folder(folder)
    with pytest.raises(FormatError, match="not a file of its folder|no checksummed"):
        lowbit.load(folder)
    assert json.loads((folder / "lowbit.json").read_text())["runtime"] == "onnxruntime"
