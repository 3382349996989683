"""lowbit.load(DST, fallback=ORIGINAL): the original answers when the quantized model cannot serve."""

import sys

import pytest
import torch

import lowbit
from lowbit.errors import LowbitError, LowbitWarning
from lowbit.nn import kernels
from tests.fixtures_models import tiny_mlp


@pytest.fixture(scope="module")
def minilm_w8a8(minilm, tmp_path_factory):
    model, _, path = minilm
    folder = tmp_path_factory.mktemp("fallback") / "w8a8"
    lowbit.save(lowbit.quantize(model, "w8a8-dynamic", progress=False), folder, runtime="torch")
    return folder, path


def _copy(folder, tmp_path):
    import shutil

    return shutil.copytree(folder, tmp_path / folder.name)


def _sentence(minilm):
    _, tokenizer, _ = minilm
    return dict(tokenizer(["The original answers."], return_tensors="pt"))


def test_a_healthy_folder_serves_the_quantized_model_after_one_batch(minilm_w8a8):
    folder, original = minilm_w8a8
    model = lowbit.load(folder, fallback=original)
    labels = model.lowbit_served, model.lowbit_fallback_reason, model.lowbit_smoke
    assert labels == ("quantized", None, "passed")
    assert any(hasattr(module, "spec") for module in model.modules())


def test_a_corrupt_safetensors_serves_the_original_with_the_reason(minilm_w8a8, minilm, tmp_path):
    folder, original = minilm_w8a8
    broken = _copy(folder, tmp_path)
    data = bytearray((broken / "model.lowbit.safetensors").read_bytes())
    data[-100] ^= 0xFF
    (broken / "model.lowbit.safetensors").write_bytes(bytes(data))
    with pytest.warns(LowbitWarning, match=r"cannot serve \(ChecksumError.*model.lowbit.safetensors"):
        model = lowbit.load(broken, fallback=original)
    assert model.lowbit_served == "original" and "ChecksumError" in model.lowbit_fallback_reason
    assert not any(hasattr(module, "spec") for module in model.modules())
    with torch.inference_mode():
        assert torch.isfinite(model(**_sentence(minilm)).last_hidden_state).all()


def test_a_runtime_that_is_not_installed_serves_the_original(minilm, tmp_path, monkeypatch):
    model, _, path = minilm
    folder = tmp_path / "ort"
    lowbit.save(lowbit.quantize(model, "w8", progress=False), folder, runtime="onnxruntime")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what `import onnxruntime` meets when absent
    with pytest.warns(LowbitWarning, match=r"cannot serve .*lowbit\[onnx\]"):
        served = lowbit.load(folder, fallback=path)
    assert served.lowbit_served == "original"


def test_a_kernel_this_machine_lacks_serves_the_original(minilm_w8a8, monkeypatch):
    folder, original = minilm_w8a8
    monkeypatch.setattr(kernels, "fbgemm_available", lambda: False)  # a PyTorch build without fbgemm
    with pytest.warns(LowbitWarning, match="a kernel this machine lacks: .*fbgemm"):
        served = lowbit.load(folder, fallback=original)
    assert served.lowbit_served == "original" and "fbgemm" in served.lowbit_fallback_reason


def test_a_batch_that_fails_on_the_original_too_proves_nothing(tmp_path):
    mlp = tiny_mlp().eval()
    folder = tmp_path / "mlp"
    lowbit.save(lowbit.quantize(mlp, "w8", progress=False), folder)
    with pytest.warns(LowbitWarning, match="fails on the original too .* proves nothing"):
        served = lowbit.load(folder, skeleton=tiny_mlp(), fallback=mlp, smoke_input=torch.ones(2, 3))
    assert served.lowbit_served == "quantized"
    assert served.lowbit_smoke.startswith("inconclusive: it fails on the original too")


def test_a_plain_module_without_an_input_is_loaded_unchecked_and_says_so(tmp_path):
    mlp = tiny_mlp().eval()
    folder = tmp_path / "mlp"
    lowbit.save(lowbit.quantize(mlp, "w8", progress=False), folder)
    with pytest.warns(LowbitWarning, match="no input to run one batch through it"):
        served = lowbit.load(folder, skeleton=tiny_mlp(), fallback=mlp)
    assert served.lowbit_served == "quantized" and served.lowbit_smoke.startswith("not run: no input")
    assert lowbit.load(folder, skeleton=tiny_mlp(), fallback=mlp,
                       smoke_input=torch.ones(2, 64)).lowbit_smoke == "passed"


def test_when_the_original_cannot_open_either_the_error_gives_both_reasons(minilm_w8a8, tmp_path):
    folder, _ = minilm_w8a8
    broken = _copy(folder, tmp_path)
    (broken / "lowbit.json").write_text("{}")
    with pytest.raises(LowbitError, match=r"cannot serve \(.*\), and the original .*nowhere.* cannot be"):
        lowbit.load(broken, fallback=tmp_path / "nowhere")


def test_bench_with_fallback_measures_the_original_and_says_why(minilm_w8a8, tmp_path):
    import json
    import os
    import subprocess
    from pathlib import Path

    folder, original = minilm_w8a8
    broken = _copy(folder, tmp_path)
    (broken / "config.json").write_text((broken / "config.json").read_text() + " ")
    root = Path(__file__).parents[1]
    result = subprocess.run([sys.executable, "-m", "lowbit.cli", "bench", str(broken),
                             "--fallback", str(original), "--batch-size", "1", "--samples", "3",
                             "--seq-len", "16", "--json"],
                            capture_output=True, text=True, cwd=root, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(root), "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["served"] == "original" and "config.json" in report["fallback_reason"]
    assert "warning: " in result.stderr and "cannot serve" in result.stderr
    assert report["latency_ms"]["1"]["p50"] > 0


def test_compare_with_fallback_measures_the_original_in_place_of_a_broken_folder(minilm_w8a8, wiki_sentences,
                                                                                 tmp_path):
    folder, original = minilm_w8a8
    broken = _copy(folder, tmp_path)
    (broken / "model.lowbit.safetensors").write_bytes(b"")
    with pytest.warns(LowbitWarning, match="cannot serve"):
        comparison = lowbit.compare(original, broken, wiki_sentences[:8], batch_sizes=(1,), runs=3,
                                    memory=False, progress=False, fallback=True)
    assert comparison.quantized["served"] == "original"
    assert comparison.quality["cosine"]["quantized"] == pytest.approx(1.0, abs=1e-5)
    assert "cannot serve" in comparison.to_markdown()


def test_a_corrupt_scikit_learn_file_serves_the_original_estimator(tmp_path):
    import numpy as np
    from sklearn.neural_network import MLPClassifier

    rows = np.random.default_rng(0).normal(size=(200, 20))
    estimator = MLPClassifier((64,), max_iter=2000, random_state=0).fit(rows, rows[:, 0] > 0)
    path = lowbit.sklearn.quantize(estimator, 8, data=rows).save(tmp_path / "m.lowbit")
    assert lowbit.load(path, fallback=estimator).lowbit_smoke == "passed"  # a row of zeros, predicted
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.warns(LowbitWarning, match="cannot serve"):
        served = lowbit.load(path, fallback=estimator)
    assert served.lowbit_served == "original" and served.coefs_ is estimator.coefs_
    assert not hasattr(estimator, "lowbit_served")  # the caller's object is not touched
