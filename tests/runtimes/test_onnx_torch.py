"""Plain PyTorch models in ONNX Runtime (lowbit.runtimes.onnx_torch): lowbit's integers and grids
in QDQ form, every static convolution on ONNX Runtime's QLinearConv."""

import collections
import json

import pytest
import torch
from torch import nn

import lowbit
from lowbit.nn.qconv import QConv2d
from lowbit.runtimes import onnx_torch
from lowbit.runtimes import onnxruntime as ort_runtime
from lowbit.runtimes.onnx_modules import ExportError
from tests.fixtures_models import same_padding_cnn, tiny_mlp
from tests.runtimes.test_onnxruntime import _reference_kernels
from tests.transform.test_fold import batches, conv_net


def _optimized_ops(path, tmp_path):
    """What ONNX Runtime runs after its graph optimizations, op by op."""
    import onnx
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(options.optimized_model_filepath, load_external_data=False)
    return collections.Counter(node.op_type for node in optimized.graph.node)


def _output_steps(model, expected, got):
    """|got - expected| in steps of the last module's output grid."""
    return (got - expected).abs() / float(model[6].output_scale)


def test_a_static_conv_net_runs_on_qlinearconv_within_one_output_step(tmp_path):
    quantized = lowbit.quantize(conv_net(), "w8a8-static", calibration=batches(), progress=False)
    folder = lowbit.save(quantized, tmp_path / "m", runtime="onnxruntime")
    loaded = lowbit.load(folder)  # no skeleton: the graph is the architecture
    x = torch.randn(5, 3, 12, 12, generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        steps = _output_steps(quantized, quantized(x), loaded(x))
    # ONNX Runtime requantizes int32 sums and rounds the bias to int32: a value can land one
    # step away where lowbit's float reference sits on a rounding boundary, rarely
    assert float(steps.max()) <= 1.0 + 1e-3 and float((steps > 0.5).float().mean()) < 0.01
    ops = _optimized_ops(folder / "model.onnx", tmp_path)
    assert ops["QLinearConv"] == 3 and ops["Conv"] == 0 and ops["Clip"] == 0
    manifest = json.loads((folder / "lowbit.json").read_text())
    assert set(manifest["onnx"]["ops"].values()) == {"QLinearConv"}


def test_the_same_numbers_as_unsigned_weights_on_a_cpu_without_vnni(tmp_path, monkeypatch):
    quantized = lowbit.quantize(conv_net(), "w8a8-static", calibration=batches(), progress=False)
    graph = ort_runtime.export(quantized)
    vnni = onnx_torch.has_vnni()
    monkeypatch.setattr(onnx_torch, "has_vnni", lambda: False)
    unsigned = onnx_torch.for_this_cpu(graph)
    assert unsigned != graph
    x = batches()[0]
    unsigned_out = ort_runtime.session(unsigned, threads=1).run(None, {"input": x.numpy()})[0]
    with torch.inference_mode():  # lowbit's reference, within one output step as on QLinearConv
        steps = _output_steps(quantized, quantized(x), torch.from_numpy(unsigned_out))
    assert float(steps.max()) <= 1.0 + 1e-3 and float((steps > 0.5).float().mean()) < 0.01
    if vnni:  # signed weights saturate in ONNX Runtime without VNNI; with it, both are exact
        signed_out = ort_runtime.session(graph, threads=1).run(None, {"input": x.numpy()})[0]
        assert abs(signed_out - unsigned_out).max() <= 1e-6


def test_a_near_dead_channel_keeps_its_bias(tmp_path):
    model = conv_net()
    with torch.no_grad():
        model[4].weight[3] = 1e-12  # batch norm gain ~0: the folded channel is its bias alone
    quantized = lowbit.quantize(model, "w8a8-static", calibration=batches(), progress=False)
    loaded = lowbit.load(lowbit.save(quantized, tmp_path / "m", runtime="onnxruntime"))
    x = batches()[1]
    with torch.inference_mode():
        assert float(_output_steps(quantized, quantized(x), loaded(x)).max()) <= 1.0 + 1e-3


def test_weight_only_convolutions_and_linears_run_too(tmp_path):
    model = same_padding_cnn().eval()
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    quantized = _reference_kernels(lowbit.quantize(model, "w8", progress=False))
    quantized.lowbit_example_input = x[:1]
    loaded = lowbit.load(lowbit.save(quantized, tmp_path / "m", runtime="onnxruntime"))
    with torch.inference_mode():
        assert torch.allclose(loaded(x), quantized(x), atol=1e-5)


def test_a_module_without_an_exact_kernel_is_named_and_nothing_is_written(tmp_path):
    model = tiny_mlp()
    quantized = lowbit.quantize(model, "w8a8-dynamic", calibration=[torch.randn(2, 64)], progress=False)
    quantized.lowbit_example_input = torch.randn(1, 64)
    with pytest.raises(ExportError, match=r"'0'.*dynamic"):
        lowbit.save(quantized, tmp_path / "m", runtime="onnxruntime")
    assert not (tmp_path / "m").exists()


def test_efficientnet_static_in_onnxruntime_matches_lowbit(tmp_path):
    from lowbit.data import assets
    from lowbit.evaluate import sqnr_db

    model, photos = assets.efficientnet_lite0(), assets.sample_photos()
    quantized = lowbit.quantize(model, "w8a8-static", calibration=list(photos.flip(-1).split(4)),
                                progress=False)
    folder = lowbit.save(quantized, tmp_path / "m", runtime="onnxruntime")
    loaded = lowbit.load(folder)
    with torch.inference_mode():
        reference, expected, got = model(photos), quantized(photos), loaded(photos)
    convolutions = sum(isinstance(module, QConv2d) for module in quantized.modules())
    assert _optimized_ops(folder / "model.onnx", tmp_path)["QLinearConv"] == convolutions == 49
    # one-step rounding differences compound over 50 layers: measured 27.8 dB between the two,
    # while quantization itself costs the model 15.5 dB against fp32
    assert sqnr_db(expected, got) > 24
    assert abs(sqnr_db(reference, got) - sqnr_db(reference, expected)) < 1.0
    agreement = float((got.argmax(-1) == reference.argmax(-1)).float().mean())
    assert agreement >= 0.8  # ONNX Runtime's own quantize_static: 0.75 on these photos


def test_auto_times_a_plain_model_with_its_example_input(tmp_path):
    quantized = lowbit.quantize(conv_net(), "w8a8-static", calibration=batches(), progress=False)
    folder = lowbit.save(quantized, tmp_path / "m", runtime="auto")
    choice = json.loads((folder / "lowbit.json").read_text())["runtime_choice"]
    assert set(choice["median_ms"]["eager"]) == {"1x3x12x12", "8x3x12x12"}


def test_bn_free_nets_and_plain_nn_conv2d_export_too(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(3))
    quantized = lowbit.quantize(model, "w8a8-static", calibration=[x], progress=False)
    loaded = lowbit.load(lowbit.save(quantized, tmp_path / "m", runtime="onnxruntime"))
    with torch.inference_mode():
        steps = (loaded(x) - quantized(x)).abs() / float(quantized[2].output_scale)
    assert float(steps.max()) <= 1.0 + 1e-3


def test_residual_sums_add_in_int8(tmp_path):
    from tests.fixtures_models import residual_net
    from tests.transform.test_fold import residual_batches

    calibration = residual_batches()
    quantized = lowbit.quantize(residual_net(), "w8a8-static", calibration=calibration, progress=False)
    folder = lowbit.save(quantized, tmp_path / "m", runtime="onnxruntime")
    ops = _optimized_ops(folder / "model.onnx", tmp_path)
    assert ops["QLinearAdd"] == 2 and ops["QLinearConv"] == 6 and ops["Add"] == 0
    x = calibration[1]
    with torch.inference_mode():
        steps = (lowbit.load(folder)(x) - quantized(x)).abs() / float(quantized[4].output_scale)
    assert float(steps.max()) <= 2.0 + 1e-3  # int8 adds round their sums in their own way too


def test_a_fresh_process_exports_rounding_points_before_any_call(tmp_path):
    """torch's exporter builds its op registry on first use: the rounding ops must be known by
    then, even when the quantized model was never called."""
    import subprocess
    import sys

    script = ("import lowbit; from tests.transform.test_fold import residual_batches; "
              "from tests.fixtures_models import residual_net; "
              "q = lowbit.quantize(residual_net(), 'w8a8-static', calibration=residual_batches(), "
              f"progress=False); lowbit.save(q, {str(tmp_path / 'm')!r}, runtime='onnxruntime')")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "m" / "model.onnx").is_file()


def test_a_float_output_leaves_onnx_runtime_unrounded_too(tmp_path):
    model = tiny_mlp().eval()
    calibration = [torch.randn(8, 64, generator=torch.Generator().manual_seed(seed)) for seed in range(3)]
    quantized = lowbit.quantize(model, "w8a8-static", calibration=calibration, progress=False)
    assert quantized[2].spec.output == "float"
    quantized.lowbit_example_input = calibration[0][:1]
    loaded = lowbit.load(lowbit.save(quantized, tmp_path / "m", runtime="onnxruntime"))
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(9))
    with torch.inference_mode():
        expected, got = quantized(x), loaded(x)
    # no output grid in either: the float sums agree, but for a hidden value that sits on a
    # rounding boundary of the last Linear's input grid and lands one step away (rarely)
    difference = (got - expected).abs()
    one_input_step = float(quantized[2].input_scale) * float(quantized[2].dequantized_weight().abs().max())
    assert float(difference.median()) < 1e-5 and int((difference > 1e-4).any(dim=1).sum()) <= 2
    assert float(difference.max()) <= one_input_step
