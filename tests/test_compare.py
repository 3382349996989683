import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import lowbit
from lowbit.data.datasets import DataError, read_dataset
from tests.cli.test_cli import FACTORY, assert_refused
from tests.cli.test_cli import lowbit as run_cli
from tests.fixtures_models import tiny_mlp


@pytest.fixture
def labelled_tensors(tmp_path):
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(40, 64, generator=generator)
    labels = tiny_mlp()(inputs).argmax(-1)
    path = tmp_path / "data.safetensors"
    save_file({"input": inputs, "label": labels}, path)
    return path


def test_compare_measures_everything_the_json_promises(labelled_tensors, tmp_path):
    model = tiny_mlp().eval()
    model.lowbit_factory = FACTORY
    quantized = lowbit.quantize(model, "w8a8-dynamic")
    comparison = lowbit.compare(model, quantized, labelled_tensors, metric="accuracy",
                                batch_sizes=(1, 8), runs=3, progress=False)
    report = json.loads(comparison.to_json())
    for side in ("original", "quantized"):
        entry = report[side]
        for key in ("size_bytes", "param_bytes", "peak_rss_bytes", "load_seconds", "throughput"):
            assert entry[key] is not None, (side, key)
        assert set(entry["latency_ms"]) == {"1", "8"}
        assert {"p50", "p95", "p99", "mean"} <= set(entry["latency_ms"]["1"])
        assert "accuracy" in entry["quality"]
    assert report["quality"]["accuracy"]["original"] == 1.0
    assert {"delta", "layers", "verdict"} <= set(report)
    assert [layer["name"] for layer in report["layers"]] and "kernel" in report["layers"][0]
    assert report["quantized"]["param_bytes"] < report["original"]["param_bytes"]
    assert "## Verdict" in comparison.to_markdown()
    html = comparison.to_html()
    assert html.count("data:image/png;base64") == 3 and "http" not in html.replace("http-equiv", "")


def test_compare_of_a_model_with_itself_shows_no_quality_change(labelled_tensors):
    model = tiny_mlp().eval()
    comparison = lowbit.compare(model, model, labelled_tensors, runs=2, memory=False, progress=False)
    assert comparison.quality["agreement"]["delta"] == 0.0
    assert comparison.quality["sqnr"]["quantized"] == float("inf")


@pytest.mark.parametrize("suffix, content", [
    (".jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n'),
    (".txt", "first line\n\nsecond line\n"),
    (".csv", "text,label\nhello,1\nworld,0\n"),
    (".csv", "x1,x2,label\n1.0,2.0,1\n3.0,4.0,0\n"),
])
def test_text_and_table_data_files_are_read(tmp_path, suffix, content):
    path = tmp_path / f"data{suffix}"
    path.write_text(content)
    assert len(read_dataset(path)) == 2


def test_numpy_and_torch_tensor_files_are_read(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((3, 4), dtype=np.float32))
    torch.save({"input": torch.zeros(5, 4), "label": torch.zeros(5)}, tmp_path / "x.pt")
    assert len(read_dataset(tmp_path / "x.npy")) == 3
    assert len(read_dataset(tmp_path / "x.pt").labels) == 5


@pytest.mark.parametrize("name, content, message", [
    ("empty.jsonl", "", "no samples"),
    ("bad.jsonl", "{not json}\n", "bad.jsonl:1"),
    ("mixed.jsonl", '{"text": "a", "label": 1}\n{"text": "b"}\n', "some samples have a label"),
    ("data.xml", "<x/>", "unsupported data file"),
    ("broken.safetensors", "garbage", "not a readable tensor file"),
])
def test_bad_data_files_are_clear_errors(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_dataset(path)


def test_cli_compare_writes_json_and_html(tmp_path, labelled_tensors):
    weights = tmp_path / "w.safetensors"
    save_file(tiny_mlp().state_dict(), weights)
    quantized = tmp_path / "q"
    assert run_cli("quantize", FACTORY, "--weights", weights, "--out", quantized).returncode == 0
    result = run_cli("compare", FACTORY, quantized, "--data", labelled_tensors, "--metric", "accuracy",
                     "--runs", "3", "--json", tmp_path / "r.json", "--html", tmp_path / "r.html")
    assert result.returncode in (0, 3), result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["verdict"]["passed"] == (result.returncode == 0)
    assert (tmp_path / "r.html").read_text().startswith("<!doctype html>")


def test_cli_compare_with_missing_data_is_refused(tmp_path):
    assert_refused(run_cli("compare", FACTORY, FACTORY, "--data", tmp_path / "none.jsonl",
                           "--json", tmp_path / "r.json"), "does not exist", tmp_path / "r.json")


def test_wikipedia_sample_file_is_labelled_jsonl(tmp_path):
    from lowbit.data.assets import write_wikipedia_jsonl

    dataset = read_dataset(write_wikipedia_jsonl(tmp_path / "wiki.jsonl", 5, offset=100))
    assert len(dataset) == 5 and dataset.labels is not None and all(dataset.texts)
