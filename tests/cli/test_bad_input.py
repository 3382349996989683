"""Every option is validated where it is parsed, and every bad input is exit code 2 with a message:
never exit 1 with a traceback, never accepted and silently ignored (issue 10)."""

import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from lowbit.cli import app
from tests.fixtures_models import tiny_mlp

FACTORY = "tests.fixtures_models:tiny_mlp"
runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(arg) for arg in args], env={"COLUMNS": "200"})


def assert_exit_2(result, message=None):
    output = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert result.exit_code == 2, output
    assert "Traceback" not in output
    if message:
        assert re.search(message, re.sub(r"\s+", " ", output)), output


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    save_file(tiny_mlp().state_dict(), root / "w.safetensors")
    np.save(root / "empty.npy", np.zeros((0, 64), np.float32))
    np.save(root / "strings.npy", np.array(["a", "b"]))
    torch.save("just text", root / "text.pt")
    (root / "zero.npy").write_bytes(b"")
    (root / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (root / "ok.jsonl").write_text('{"text": "a sentence"}\n')
    save_file({"input": torch.randn(8, 64)}, root / "x.safetensors")
    return root


@pytest.mark.parametrize("name, message", [
    ("empty.npy", "no samples"), ("strings.npy", "not a readable tensor file"),
    ("text.pt", "no input tensor"), ("zero.npy", "not a readable tensor file"),
    ("latin1.txt", "not UTF-8"),
])
def test_unreadable_data_files_are_exit_2(files, name, message):
    assert_exit_2(run("bench", FACTORY, "--data", files / name), message)


@pytest.mark.parametrize("option", [
    ("bench", FACTORY, "--batch-size", "0"), ("bench", FACTORY, "--samples", "0"),
    ("bench", FACTORY, "--threads", "0"), ("bench", FACTORY, "--seq-len", "0"),
    ("compare", FACTORY, FACTORY, "--data", "x", "--runs", "0"),
    ("compare", FACTORY, FACTORY, "--data", "x", "--samples", "-1"),
    ("compare", FACTORY, FACTORY, "--data", "x", "--max-drop", "nan"),
    ("compare", FACTORY, FACTORY, "--data", "x", "--max-drop", "-0.1"),
    ("quantize", FACTORY, "--out", "q", "--group-size", "0"),
    ("quantize", "m.joblib", "--out", "q", "--bits", "7"),
    ("quantize", "m.joblib", "--out", "q", "--probability-tolerance", "2"),
    ("quantize", "m.joblib", "--out", "q", "--weight-threshold", "inf"),
    ("tune", FACTORY, "--data", "x", "--max-drop", "0.1", "--out", "q", "--candidates", ","),
    ("tune", FACTORY, "--data", "x", "--max-drop", "0.1", "--out", "q", "--time-budget", "0"),
    ("demo", "--sentences", "0"),
], ids=lambda option: " ".join(option[:1] + option[-2:]))
def test_out_of_range_options_are_refused_where_they_are_parsed(option, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_exit_2(run(*option), f"Invalid value for '{option[-2]}'")
    assert not (tmp_path / "q").exists()


def test_an_unsupported_group_size_is_refused_not_ignored(files, tmp_path):
    assert_exit_2(run("quantize", FACTORY, "--weights", files / "w.safetensors", "--recipe", "w4",
                      "--group-size", "48", "--out", tmp_path / "q"), "group size 48")
    assert not (tmp_path / "q").exists()


def test_a_read_only_destination_is_exit_2_with_nothing_written(files, tmp_path):
    assert_exit_2(run("quantize", FACTORY, "--weights", files / "w.safetensors", "--out", "/proc/lowbit-out"),
                  "cannot|not writable|failed")


def test_a_full_disk_is_exit_2_and_leaves_no_partial_folder(files, tmp_path, monkeypatch):
    import errno

    import lowbit.formats.lowbit_format as folder_format

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(folder_format, "save_file", full)
    assert_exit_2(run("quantize", FACTORY, "--weights", files / "w.safetensors", "--out", tmp_path / "q"),
                  "No space left")
    assert list(tmp_path.iterdir()) == []


def test_a_report_target_that_is_a_folder_is_exit_2(files, tmp_path):
    (tmp_path / "report.json").mkdir()
    result = run("compare", FACTORY, FACTORY, "--data", files / "x.safetensors", "--metric", "agreement",
                 "--runs", "2", "--samples", "8", "--no-memory", "--json", tmp_path / "report.json")
    assert_exit_2(result, "is a folder")


def test_scikit_learn_overwrite_onto_a_folder_is_exit_2(tmp_path):
    import joblib
    from sklearn.datasets import load_iris
    from sklearn.naive_bayes import GaussianNB

    features, labels = load_iris(return_X_y=True)
    joblib.dump(GaussianNB().fit(features, labels), tmp_path / "m.joblib")
    np.save(tmp_path / "x.npy", features)
    (tmp_path / "out.lowbit").mkdir()
    assert_exit_2(run("quantize", tmp_path / "m.joblib", "--trust-pickle", "--data", tmp_path / "x.npy",
                      "--out", tmp_path / "out.lowbit", "--overwrite"), "folder")
    assert (tmp_path / "out.lowbit").is_dir() and list((tmp_path / "out.lowbit").iterdir()) == []


def test_a_valid_json_report_is_written_and_an_existing_one_replaced(files, tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")
    result = run("compare", FACTORY, FACTORY, "--data", files / "x.safetensors", "--metric", "agreement",
                 "--runs", "2", "--samples", "8", "--no-memory", "--json", target)
    assert result.exit_code in (0, 3), result.output
    assert json.loads(target.read_text())["quality"]


def test_names_from_a_file_that_cannot_be_printed_are_escaped_not_a_crash(tmp_path):
    """Found by the fuzzer (seed 4): an array path holding a lone surrogate made `inspect` fail,
    and then every later print of the same console."""
    import zipfile

    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    import lowbit.sklearn as lowbit_sklearn
    from tests.formats.attacker import rewrite_sklearn_file

    features, labels = load_iris(return_X_y=True)
    path = lowbit_sklearn.quantize(LogisticRegression(max_iter=300).fit(features, labels), bits=8,
                                   data=features).save(tmp_path / "m.lowbit")

    def rename(entries):
        text = entries["skeleton.json"].decode().replace('"path":"model.coef_"', '"path":"\\udcff[bold]coef"')
        entries["skeleton.json"] = text.encode()
    rewrite_sklearn_file(path, rename)
    assert "udcff" in zipfile.ZipFile(path).read("skeleton.json").decode()
    for _ in range(2):  # a failed print must not poison the next one
        result = run("inspect", path)
        assert result.exit_code == 0, result.output
        assert "\\udcff[bold]coef" in result.output
    assert_exit_2(run("inspect", tmp_path / "missing.lowbit"))
