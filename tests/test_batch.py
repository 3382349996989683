"""lowbit batch: a folder of models in one command; failures do not stop the rest; reruns resume."""

import json

import joblib
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from sklearn.neural_network import MLPClassifier

from lowbit.errors import LowbitError
from lowbit.families.batch import STATE, discover, run_batch
from tests.fixtures_models import tiny_mlp


@pytest.fixture
def models(tmp_path, minilm):
    """A folder with MiniLM, a factory MLP (with data), a scikit-learn pickle and a corrupt one."""
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "minilm").symlink_to(minilm[2], target_is_directory=True)
    generator = torch.Generator().manual_seed(0)
    save_file(tiny_mlp().state_dict(), folder / "mlp.safetensors")
    save_file({"input": torch.randn(64, 64, generator=generator)}, folder / "mlp-inputs.safetensors")
    (folder / "lowbit-batch.json").write_text(json.dumps({"models": {"mlp": {
        "factory": "tests.fixtures_models:tiny_mlp", "weights": "mlp.safetensors",
        "data": "mlp-inputs.safetensors"}}}))
    rows = np.random.default_rng(0).normal(size=(200, 20))
    classifier = MLPClassifier((64,), max_iter=2000, random_state=0).fit(rows, rows[:, 0] > 0)
    joblib.dump(classifier, folder / "logistic.joblib")
    np.save(tmp_path / "rows.npy", rows)
    (folder / "broken.joblib").write_bytes(b"not a pickle at all")
    (tmp_path / "data.json").write_text(json.dumps({"logistic": "rows.npy"}))
    return folder, tmp_path / "data.json"


def test_every_model_gets_a_verdict_or_a_reason_and_a_rerun_only_prints(models, tmp_path):
    folder, data_map = models
    out = tmp_path / "out"
    result = run_batch(folder, out, data_map=data_map, trust_pickle=True)
    rows = {row.name: row for row in result.rows}
    assert set(rows) == {"minilm", "mlp", "logistic", "broken"}
    assert rows["broken"].status == "failed" and "broken.joblib" in rows["broken"].reason
    assert rows["minilm"].verdict == "unchecked (no data)" and (out / "minilm" / "lowbit.json").is_file()
    assert rows["mlp"].verdict in ("pass", "fail") and rows["mlp"].metric and rows["mlp"].speedup > 0
    assert rows["logistic"].verdict == "pass" and (out / "logistic.lowbit").is_file()
    assert all(row.status == "done" for name, row in rows.items() if name != "broken")
    assert json.loads((out / "batch.json").read_text())["models"][0]["name"] == "broken"

    stamp = (out / STATE / "minilm.json").stat().st_mtime_ns
    again = run_batch(folder, out, data_map=data_map, trust_pickle=True)
    assert all(row.skipped for row in again.rows)
    assert (out / STATE / "minilm.json").stat().st_mtime_ns == stamp
    assert [row.verdict for row in again.rows] == [row.verdict for row in result.rows]


def test_without_trust_pickle_a_pickle_fails_alone_with_the_way_out(models, tmp_path):
    folder, _ = models
    (folder / "minilm").unlink()
    result = run_batch(folder, tmp_path / "out")
    rows = {row.name: row for row in result.rows}
    assert "--trust-pickle" in rows["logistic"].reason and rows["mlp"].status == "done"


def test_an_output_folder_inside_the_source_is_refused(models):
    folder, _ = models
    with pytest.raises(LowbitError, match="inside the source folder"):
        discover(folder, folder / "quantized")


def test_two_models_with_one_output_name_are_refused_before_anything_runs(models, tmp_path):
    folder, _ = models
    (folder / "logistic.pkl").write_bytes((folder / "logistic.joblib").read_bytes())
    with pytest.raises(LowbitError, match="would both write .*logistic.lowbit"):
        run_batch(folder, tmp_path / "out", trust_pickle=True)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("options", [{"workers": 2}, {"workers": 2, "ray_address": "local"}],
                         ids=["processes", "ray"])
def test_workers_give_the_same_rows_and_say_where_each_ran(models, tmp_path, options, request):
    folder, data_map = models
    if "ray_address" in options:
        ray = pytest.importorskip("ray")
        request.addfinalizer(ray.shutdown)
    (folder / "minilm").unlink()
    serial = run_batch(folder, tmp_path / "serial", data_map=data_map, trust_pickle=True)
    parallel = run_batch(folder, tmp_path / "parallel", data_map=data_map, trust_pickle=True, **options)
    statuses = [(row.name, row.status) for row in serial.rows]
    assert [(row.name, row.status) for row in parallel.rows] == statuses
    assert "timed in the workers while up to 2 models ran at once" in parallel.notes[0]
    logistic = next(row for row in parallel.rows if row.name == "logistic")
    assert logistic.verdict == "pass" and logistic.node
    if "ray_address" in options:
        assert all("ray node" in row.node for row in parallel.rows)


def _cli(*args):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parents[1]
    return subprocess.run([sys.executable, "-m", "lowbit.cli", "batch", *map(str, args)], capture_output=True,
                          text=True, cwd=root, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(root), "COLUMNS": "80"})


def test_the_command_prints_a_verdict_per_model_and_exits_3_on_a_failure(models, tmp_path):
    folder, data_map = models
    (folder / "minilm").unlink()
    result = _cli(folder, "--out", tmp_path / "out", "--data-map", data_map, "--trust-pickle")
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert any(line.split()[:2] == ["logistic", "pass"] for line in lines if line.strip())
    assert any("broken" in line and "failed" in line for line in lines)
    long = [line for line in lines if len(line) > 80]
    assert long and all(len(line.split()) <= 2 and str(tmp_path) in line for line in long)  # only paths
    refused = _cli(folder, "--out", folder / "quantized")
    assert refused.returncode == 2 and "inside the source folder" in refused.stderr


def test_a_folder_and_a_file_of_one_name_are_refused(models, tmp_path):
    folder, _ = models
    (folder / "minilm.joblib").write_bytes((folder / "logistic.joblib").read_bytes())
    with pytest.raises(LowbitError, match="both named 'minilm'"):
        discover(folder, tmp_path / "out")


def test_a_rerun_with_other_settings_redoes_the_models(models, tmp_path):
    folder, data_map = models
    (folder / "minilm").unlink()
    (folder / "broken.joblib").unlink()
    out = tmp_path / "out"
    run_batch(folder, out, data_map=data_map, trust_pickle=True)
    again = run_batch(folder, out, data_map=data_map, trust_pickle=True, recipe="w8")
    assert not any(row.skipped for row in again.rows if row.family == "torch")
    assert next(row for row in again.rows if row.name == "mlp").recipe == "w8"
