"""The command line as a user runs it: real entry point, exit codes, no tracebacks, no partial output."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.fixtures_models import tiny_mlp

ROOT = Path(__file__).parents[2]
FACTORY = "tests.fixtures_models:tiny_mlp"


def lowbit(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "lowbit.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "mlp.safetensors"
    save_file(tiny_mlp().state_dict(), path)
    return path


def assert_refused(result, message, *not_created):
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for path in not_created:
        assert not Path(path).exists()


def test_help_explains_with_an_example_and_fits_80_columns():
    """Every command's --help has an example on a line of its own, and at 80 columns no option
    name is cut (click's plain layout wraps, it never truncates). One runs through the real entry
    point; the others in this process (each new interpreter takes seconds to import torch)."""
    from typer.testing import CliRunner

    from lowbit.cli import app

    entry = subprocess.run([sys.executable, "-m", "lowbit.cli", "quantize", "--help"], capture_output=True,
                           text=True, env={**os.environ, "COLUMNS": "80"}, timeout=120)
    assert entry.returncode == 0 and "--probability-tolerance" in entry.stdout, entry.stderr
    helps = {"quantize": entry.stdout}
    for command in ("inspect", "compare", "bench", "tune", "estimate", "demo", "qat", "export", "prune"):
        result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "80"})
        assert result.exit_code == 0, result.output
        helps[command] = result.output
    for command, text in helps.items():
        assert "Example" in text and f"\n    lowbit {command} " in text, command
        assert "…" not in text and max(map(len, text.splitlines())) <= 80, command


def test_quantize_inspect_and_load_a_factory_model(tmp_path, weights):
    out = tmp_path / "mlp-w8a8"
    result = lowbit("quantize", FACTORY, "--weights", weights, "--recipe", "w8a8-dynamic", "--out", out)
    assert result.returncode == 0, result.stderr
    assert "quantized 2 modules" in result.stdout
    assert "runtime: eager (no example input" in result.stdout  # auto, the default, says why
    listing = json.loads(lowbit("inspect", out, "--json").stdout)
    assert listing["modules"]["0"]["spec"]["weight"] == "int8"
    kernel = listing["modules"]["0"]["spec"]["kernels"]["1"]
    table = lowbit("inspect", out, "--verify")
    assert table.returncode == 0 and kernel in table.stdout and "matches its recorded sha256" in table.stdout
    import lowbit as api

    with pytest.raises(api.FormatError, match="trust_code"):  # importing the factory needs trust
        api.load(out)
    model = api.load(out, trust_code=True)  # the manifest names the factory
    assert torch.equal(model[0].weight, api.quantize(tiny_mlp(), "w8a8-dynamic")[0].weight)


def test_static_quantize_with_calibration_file(tmp_path, weights):
    data = tmp_path / "calib.safetensors"
    save_file({"input": torch.randn(32, 64)}, data)
    out = tmp_path / "static"
    result = lowbit("quantize", FACTORY, "--weights", weights, "-r", "w8a8-static",
                    "--calibration", data, "--out", out)
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "lowbit.json").read_text())["recipe"]["scheme"] == "static"


def test_qat_trains_and_saves_a_folder_with_its_loss_curve(tmp_path, weights):
    data = tmp_path / "train.safetensors"
    save_file({"input": torch.randn(64, 64)}, data)
    out = tmp_path / "qat"
    result = lowbit("qat", FACTORY, "--weights", weights, "-r", "w4-g32", "--data", data, "--steps", 6,
                    "--batch-size", 16, "--out", out)
    assert result.returncode == 0, result.stderr
    assert "6 steps" in result.stdout and "loss" in result.stdout
    manifest = json.loads((out / "lowbit.json").read_text())
    assert manifest["training"]["steps"] == 6 and manifest["training"]["loss"] == "kl"
    assert manifest["recipe"]["weights"] == "int4"
    inspected = lowbit("inspect", out)
    assert inspected.returncode == 0 and "trained after quantizing: distillation, 6 steps" in inspected.stdout


def test_qat_takes_the_loss_asked_for_and_refuses_an_unknown_one(tmp_path, weights):
    data = tmp_path / "train.safetensors"
    save_file({"input": torch.randn(32, 64)}, data)
    out = tmp_path / "qat"
    assert_refused(lowbit("qat", FACTORY, "--weights", weights, "--data", data, "--steps", 2,
                          "--loss", "cosine", "--out", out), "is not one of auto, kl, embedding", out)
    assert_refused(lowbit("qat", FACTORY, "--weights", weights, "--data", data, "--steps", 2,
                          "--loss", "layers", "--out", out), "hidden states", out)
    result = lowbit("qat", FACTORY, "--weights", weights, "--data", data, "--steps", 2, "--loss", "mse",
                    "--out", out)
    assert result.returncode == 0, result.stderr
    assert "(mse loss)" in result.stdout
    assert json.loads((out / "lowbit.json").read_text())["training"]["loss"] == "mse"


def test_qat_without_a_budget_is_refused(tmp_path, weights):
    data = tmp_path / "train.safetensors"
    save_file({"input": torch.randn(8, 64)}, data)
    out = tmp_path / "qat"
    assert_refused(lowbit("qat", FACTORY, "--weights", weights, "--data", data, "--out", out),
                   "budget", out)


def test_prune_distills_and_saves_a_smaller_sparse_folder(tmp_path, weights):
    data = tmp_path / "train.safetensors"
    save_file({"input": torch.randn(64, 64)}, data)
    dense, out = tmp_path / "dense", tmp_path / "pruned"
    assert lowbit("quantize", FACTORY, "--weights", weights, "-r", "w8", "--runtime", "torch",
                  "--out", dense).returncode == 0
    result = lowbit("prune", FACTORY, "--weights", weights, "--sparsity", 0.6, "--data", data,
                    "--override", "2=0.25", "--steps", 4, "--out", out)
    assert result.returncode == 0, result.stderr
    assert "4 steps" in result.stdout and "smaller, not faster" in result.stdout
    manifest = json.loads((out / "lowbit.json").read_text())
    assert manifest["pruning"]["criterion"] == "wanda" and manifest["pruning"]["sparsity"] == 0.6
    assert manifest["pruning"]["overrides"] == {"2": 0.25} and manifest["pruning"]["modules"]["2"] == 0.25
    assert list(manifest["sparse"]) == ["0.weight"] and manifest["training"]["steps"] == 4
    stored = {folder: (folder / "model.lowbit.safetensors").stat().st_size for folder in (dense, out)}
    assert stored[out] < 0.75 * stored[dense]
    inspected = lowbit("inspect", out)
    assert inspected.returncode == 0
    assert "pruned: 2 modules, unstructured 60%, 2 25% by wanda" in inspected.stdout


@pytest.mark.parametrize(("source", "extra", "message"), [
    ("mlp", ["--sparsity", 1.5], "[0, 1)"),
    ("mlp", ["--pattern", "4:8"], "not one of unstructured, 2:4"),
    ("mlp", ["--steps", 3], "needs --data"),
    ("mlp", ["--criterion", "sparsegpt"], "calibration batches"),
    ("mlp", ["--criterion", "obs"], "not one of magnitude, wanda, sparsegpt"),
    ("mlp", ["--override", "0.6"], "is not GLOB=SHARE"),
    ("mlp", ["--override", "0*=1.2"], "[0, 1), got 1.2 for '0*'"),
    ("tests.fixtures_models:tiny_cnn", ["--pattern", "2:4"], "multiple of 4 inputs; '0' has 27"),
])
def test_prune_refuses_bad_requests(tmp_path, weights, source, extra, message):
    out = tmp_path / "pruned"
    given = [FACTORY, "--weights", weights] if source == "mlp" else [source]
    assert_refused(lowbit("prune", *given, *extra, "--out", out), message, out)


def test_estimate_is_labelled_an_estimate(weights):
    result = lowbit("estimate", FACTORY, "--weights", weights, "--json")
    assert result.returncode == 0
    assert json.loads(result.stdout)["kind"] == "estimate"
    assert "ESTIMATE" in lowbit("estimate", FACTORY).stdout


def test_missing_source(tmp_path):
    out = tmp_path / "out"
    assert_refused(lowbit("quantize", tmp_path / "nope", "--out", out), "does not exist", out)


def test_unknown_recipe(tmp_path, weights):
    out = tmp_path / "out"
    assert_refused(lowbit("quantize", FACTORY, "--weights", weights, "-r", "w3", "--out", out),
                   "unknown recipe", out)


def test_group_size_that_does_not_divide_adapts_with_a_warning(tmp_path, weights):
    out = tmp_path / "out"
    result = lowbit("quantize", FACTORY, "--weights", weights, "-r", "w4", "--group-size", "256",
                    "--out", out)
    assert result.returncode == 0, result.stderr
    assert "group:256 does not divide every input dimension" in result.stderr
    manifest = json.loads((out / "lowbit.json").read_text())
    groups = {entry["spec"]["granularity"] for entry in manifest["modules"].values()}
    assert groups == {"group:64", "group:128"}


def test_corrupt_and_truncated_weights(tmp_path, weights):
    out = tmp_path / "out"
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(weights.read_bytes()[:200])
    assert_refused(lowbit("quantize", FACTORY, "--weights", truncated, "--out", out), "corrupt", out)
    pickle = tmp_path / "mlp.pt"
    torch.save(tiny_mlp().state_dict(), pickle)
    assert_refused(lowbit("quantize", FACTORY, "--weights", pickle, "--out", out), "no pickled", out)


def test_nan_weights_are_refused(tmp_path):
    state = tiny_mlp().state_dict()
    state["0.weight"][0, 0] = float("nan")
    nan_weights = tmp_path / "nan.safetensors"
    save_file(state, nan_weights)
    before = nan_weights.read_bytes()
    out = tmp_path / "out"
    assert_refused(lowbit("quantize", FACTORY, "--weights", nan_weights, "--out", out), "NaN", out)
    assert nan_weights.read_bytes() == before


def test_empty_and_wrongly_shaped_calibration(tmp_path, weights):
    out = tmp_path / "out"
    empty = tmp_path / "empty.safetensors"
    save_file({"input": torch.zeros(0, 64)}, empty)
    assert_refused(lowbit("quantize", FACTORY, "--weights", weights, "-r", "w8a8-static",
                          "--calibration", empty, "--out", out), "no samples", out)
    wrong = tmp_path / "wrong.safetensors"
    save_file({"input": torch.randn(8, 65)}, wrong)
    assert_refused(lowbit("quantize", FACTORY, "--weights", weights, "-r", "w8a8-static",
                          "--calibration", wrong, "--out", out), "calibration batch 0", out)


def test_existing_output_is_not_overwritten(tmp_path, weights):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_refused(lowbit("quantize", FACTORY, "--weights", weights, "--out", out), "already exists")
    assert (out / "keep.txt").read_text() == "mine"


def test_inspect_corrupt_folder(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "lowbit.json").write_text("{")
    assert_refused(lowbit("inspect", folder), "corrupt")


def test_load_checksum_mismatch_from_the_cli(tmp_path, weights):
    out = tmp_path / "q"
    assert lowbit("quantize", FACTORY, "--weights", weights, "--out", out).returncode == 0
    blob = bytearray((out / "model.lowbit.safetensors").read_bytes())
    blob[-3] ^= 0x01
    (out / "model.lowbit.safetensors").write_bytes(bytes(blob))
    assert_refused(lowbit("inspect", out, "--verify"), "sha256")


@pytest.fixture(scope="module")
def minilm_folder():
    from lowbit.data import assets

    return assets.minilm_path()


def test_static_quantize_of_a_transformers_folder_with_text_calibration(tmp_path, minilm_folder):
    from lowbit.data import assets

    data = tmp_path / "calib.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in assets.wikipedia_sentences(16, 2000)))
    out = tmp_path / "minilm-static"
    result = lowbit("quantize", minilm_folder, "-r", "w8a8-static", "--calibration", data,
                    "--skip", "embeddings*", "--out", out)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "lowbit.json").read_text())
    assert manifest["modules"]["encoder.layer.0.output.dense"]["spec"]["scheme"] == "static"
    assert "embeddings.word_embeddings" not in manifest["modules"]
    assert (out / "tokenizer.json").is_file()


def test_corrupt_transformers_folder(tmp_path, minilm_folder):
    broken = tmp_path / "broken-minilm"
    broken.mkdir()
    (broken / "config.json").write_bytes((minilm_folder / "config.json").read_bytes())
    (broken / "model.safetensors").write_bytes((minilm_folder / "model.safetensors").read_bytes()[:4096])
    out = tmp_path / "out"
    assert_refused(lowbit("quantize", broken, "--out", out),
                   "model.safetensors is not a readable safetensors file", out)


def test_calibration_text_file_that_is_not_jsonl(tmp_path, minilm_folder):
    data = tmp_path / "calib.jsonl"
    data.write_text("not json at all\n")
    out = tmp_path / "out"
    assert_refused(lowbit("quantize", minilm_folder, "-r", "w8a8-static", "--calibration", data,
                          "--out", out), "calib.jsonl:1", out)


def test_a_closed_pipe_is_a_quiet_exit(tmp_path, weights):
    """`lowbit inspect --json | head -1`: the reader leaves early; lowbit exits 0, says nothing."""
    out = tmp_path / "q"
    assert lowbit("quantize", FACTORY, "--weights", weights, "--out", out).returncode == 0
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before lowbit prints anything: every write fails
    writer = subprocess.run([sys.executable, "-m", "lowbit.cli", "inspect", str(out), "--json"],
                            stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    os.close(write_end)
    assert writer.returncode == 0 and writer.stderr == ""


def test_compare_in_a_pipe_prints_every_layer_name_whole(tmp_path, weights):
    """Through a pipe (a log), the report is its Markdown text: long lines wrap, nothing is cut."""
    out = tmp_path / "q"
    assert lowbit("quantize", FACTORY, "--weights", weights, "--out", out).returncode == 0
    data = tmp_path / "inputs.pt"
    torch.save(torch.randn(16, 64), data)
    result = lowbit("compare", FACTORY, out, "--data", data, "--runs", "3", "--no-memory")
    assert result.returncode in (0, 3), result.stderr
    assert "| measure | original | quantized | change |" in result.stdout
    assert "…" not in result.stdout and "overall:" in result.stdout


def test_tune_into_a_closed_pipe_still_writes_its_model(tmp_path, weights):
    """The reader of a long command's output left: lowbit goes quiet, finishes its work and
    exits with the command's own code."""
    data = tmp_path / "inputs.pt"
    torch.save(torch.randn(32, 64), data)
    out = tmp_path / "tuned"
    read_end, write_end = os.pipe()
    os.close(read_end)
    result = subprocess.run([sys.executable, "-m", "lowbit.cli", "tune", FACTORY, "--weights", str(weights),
                             "--data", str(data), "--metric", "agreement", "--max-drop", "0.5",
                             "--candidates", "w8", "--out", str(out)],
                            stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=300)
    os.close(write_end)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "lowbit.json").is_file()
