"""Crafted torch and transformers folders: none may import code, read outside the folder, hang or
fail with anything but a LowbitError; the CLI says so in one line with exit code 2 (issue 10)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lowbit
from lowbit.errors import ChecksumError, FormatError
from tests.fixtures_models import tiny_bert, tiny_mlp
from tests.formats.attacker import edit_manifest, forbidden, opened_under, resign_folder, watching

ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A plain module saved from a factory and a transformers model, each copied per test."""
    root = tmp_path_factory.mktemp("saved")
    mlp = tiny_mlp().eval()
    mlp.lowbit_factory = "tests.fixtures_models:tiny_mlp"
    lowbit.save(lowbit.quantize(mlp, "w8a8-dynamic", progress=False), root / "mlp")
    lowbit.save(lowbit.quantize(tiny_bert(), "w8a8-dynamic", progress=False), root / "bert")
    return root


@pytest.fixture
def places(tmp_path, saved):
    """(a fresh copy of each saved folder, an outside folder with a secret, the canary path)."""
    import shutil

    copies = tmp_path / "models"
    shutil.copytree(saved, copies)
    outside = tmp_path / "outside"
    outside.mkdir()
    save_file({"weight": torch.zeros(2)}, outside / "secret.safetensors")
    return copies, outside, outside / "canary.txt"


def lowbit_cli(*args, cwd=ROOT, stdin=None):
    return subprocess.run([sys.executable, "-m", "lowbit.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, input=stdin, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def assert_one_line_refusal(result):
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().startswith("error:") and "Traceback" not in result.stderr


def test_a_manifest_factory_is_never_imported_without_trust(places, monkeypatch):
    models, outside, canary = places
    folder = models / "mlp"
    (folder / "evilfactory.py").write_text(f"open({str(canary)!r}, 'w').write('pwned')\n"
                                           "def build():\n    raise SystemExit\n")
    edit_manifest(folder, lambda m: m["model"].update(factory="evilfactory:build"))
    resign_folder(folder)
    monkeypatch.chdir(folder)
    monkeypatch.syspath_prepend(str(folder))
    with watching() as events, pytest.raises(FormatError, match="evilfactory.*trust_code"):
        lowbit.load(folder)
    assert not canary.exists() and forbidden(events) == []
    assert_one_line_refusal(lowbit_cli("bench", folder, "--data", folder / "x.npy", cwd=folder))
    assert not canary.exists()


def test_a_manifest_naming_os_abort_does_not_kill_the_interpreter(places):
    folder = places[0] / "mlp"
    edit_manifest(folder, lambda m: m["model"].update(factory="os:abort"))
    resign_folder(folder)
    with pytest.raises(FormatError, match="'os'"):
        lowbit.load(folder)


def test_transformers_remote_code_never_runs_even_when_stdin_says_yes(places):
    models, outside, canary = places
    folder = models / "bert"
    (folder / "configuration_evil.py").write_text(f"open({str(canary)!r}, 'w').write('pwned')\n")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="evil", auto_map={"AutoConfig": "configuration_evil.EvilConfig"})
    (folder / "config.json").write_text(json.dumps(config))
    resign_folder(folder)
    with pytest.raises(FormatError, match="model_type"):
        lowbit.load(folder)
    script = (f"import lowbit\ntry:\n    lowbit.load({str(folder)!r})\n"
              "except lowbit.LowbitError as e:\n    print(e)")
    subprocess.run([sys.executable, "-c", script], input="y\ny\n", text=True, cwd=folder, timeout=300,
                   capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    source = models / "source"  # a plain transformers folder (quantize's input) with the same trick
    tiny_bert().save_pretrained(source)
    (source / "configuration_evil.py").write_text((folder / "configuration_evil.py").read_text())
    (source / "config.json").write_text(json.dumps(config))
    assert_one_line_refusal(lowbit_cli("quantize", source, "--out", models / "q", cwd=source, stdin="y\ny\n"))
    assert not canary.exists()


@pytest.mark.parametrize("where", ["parent", "absolute", "symlink"])
def test_files_outside_the_folder_are_never_read(places, where):
    models, outside, canary = places
    folder = models / "mlp"
    secret = outside / "secret.safetensors"
    tensors = load_file(folder / "model.lowbit.safetensors")
    save_file(tensors, secret)  # the attacker's file holds the right tensors, with its sha256 recorded
    name = {"parent": "../../outside/secret.safetensors", "absolute": str(secret),
            "symlink": "model.lowbit.safetensors"}[where]
    if where == "symlink":
        (folder / "model.lowbit.safetensors").unlink()
        (folder / "model.lowbit.safetensors").symlink_to(secret)
    edit_manifest(folder, lambda m: m["files"].update({name: m["files"].pop("model.lowbit.safetensors")}))
    resign_folder(folder) if where == "symlink" else None
    with watching() as events, pytest.raises(FormatError):
        lowbit.load(folder, skeleton=tiny_mlp)
    assert opened_under(events, outside) == []
    assert_one_line_refusal(lowbit_cli("inspect", folder))


def test_a_changed_config_is_caught_by_its_checksum_and_inspect_verify_says_so(places):
    folder = places[0] / "bert"
    text = (folder / "config.json").read_text()
    assert '"hidden_act": "gelu"' in text
    (folder / "config.json").write_text(text.replace('"hidden_act": "gelu"', '"hidden_act": "relu"'))
    with pytest.raises(ChecksumError, match="config.json"):
        lowbit.load(folder)
    result = lowbit_cli("inspect", folder, "--verify")
    assert_one_line_refusal(result)
    assert "sha256" in result.stderr


def test_a_config_naming_4e18_layers_is_refused_at_once(places):
    folder = places[0] / "bert"
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = 4611686018427387904
    (folder / "config.json").write_text(json.dumps(config))
    resign_folder(folder)
    start = time.perf_counter()
    with pytest.raises(FormatError, match="num_hidden_layers"):
        lowbit.load(folder)
    assert time.perf_counter() - start < 10


def _deep(depth: int):
    value: object = 0
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("change", [
    lambda m: m["modules"]["0"].pop("spec"),
    lambda m: m["modules"]["0"]["spec"].update(surprise=1),
    lambda m: m["modules"]["0"]["spec"].update(kernels={"1": ["fbgemm_dynamic"]}),
    lambda m: m["modules"]["0"]["spec"].update(kernels={"1": "no_such_kernel"}),
    lambda m: m["modules"]["0"]["spec"].update(weight="int4"),
    lambda m: m["modules"]["0"].update(type="QEmbedding"),
    lambda m: m.update(recipe={"scheme": "sideways"}),
    lambda m: m.update(comparison=_deep(3000)),
    lambda m: m["files"]["model.lowbit.safetensors"].update(sha256=12),
], ids=["spec-missing", "spec-extra-key", "kernel-list", "kernel-unknown", "weight-int4-on-int8-tensors",
        "wrong-module-type", "recipe-invalid", "json-3000-deep", "sha256-not-text"])
def test_a_malformed_manifest_is_a_format_error_naming_the_problem(places, change):
    folder = places[0] / "mlp"
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(10000)  # to write the 3000-deep case
    try:
        edit_manifest(folder, change)
    finally:
        sys.setrecursionlimit(limit)
    with pytest.raises(FormatError):
        lowbit.load(folder, skeleton=tiny_mlp)
    assert_one_line_refusal(lowbit_cli("inspect", folder))


@pytest.mark.parametrize("tensor, value", [
    ("0.weight", lambda t: t.float()),                      # float where int8 codes belong
    ("0.weight_scale", lambda t: torch.full_like(t, float("nan"))),
    ("0.weight_scale", lambda t: -t),
    ("0.weight", lambda t: t[:3]),                          # a shape the module does not have
], ids=["weight-dtype", "scale-nan", "scale-negative", "weight-shape"])
def test_tensors_that_do_not_fit_the_module_are_refused_at_load_not_at_the_first_call(places, tensor, value):
    folder = places[0] / "mlp"
    tensors = load_file(folder / "model.lowbit.safetensors")
    tensors[tensor] = value(tensors[tensor]).contiguous()
    save_file(tensors, folder / "model.lowbit.safetensors")
    resign_folder(folder)
    with pytest.raises(FormatError, match=tensor.split(".")[0]):
        lowbit.load(folder, skeleton=tiny_mlp)


def test_inspect_without_verify_refuses_a_truncated_tensor_file(places):
    folder = places[0] / "mlp"
    data = (folder / "model.lowbit.safetensors").read_bytes()
    (folder / "model.lowbit.safetensors").write_bytes(data[: len(data) // 2])
    result = lowbit_cli("inspect", folder)
    assert_one_line_refusal(result)
    assert "truncated" in result.stderr


def test_a_folder_that_loads_cleanly_still_runs_after_all_the_checks(places):
    models, _, _ = places
    model = lowbit.load(models / "bert")
    ids = torch.randint(0, 64, (2, 7))
    with torch.inference_mode():
        assert model(input_ids=ids).last_hidden_state.shape == (2, 7, 32)
    assert isinstance(lowbit.load(models / "mlp", trust_code=True), torch.nn.Module)
