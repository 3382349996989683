import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lowbit
from lowbit import ChecksumError, FormatError
from lowbit.formats import write_folder
from tests.fixtures_models import tied_lm, tiny_cnn, tiny_mlp

ROOT = Path(__file__).parents[2]


@pytest.fixture
def saved_mlp(tmp_path, mlp):
    mlp.lowbit_factory = "tests.fixtures_models:tiny_mlp"
    quantized = lowbit.quantize(mlp, "w8a8-dynamic")
    return quantized, lowbit.save(quantized, tmp_path / "mlp-w8a8")


def test_folder_has_safetensors_and_a_manifest_without_pickle(saved_mlp):
    _, folder = saved_mlp
    assert sorted(p.name for p in folder.iterdir()) == ["lowbit.json", "model.lowbit.safetensors"]
    manifest = json.loads((folder / "lowbit.json").read_text())
    assert manifest["format_version"] == 2
    assert manifest["recipe"]["scheme"] == "dynamic"
    assert manifest["modules"]["0"]["spec"]["weight"] == "int8"
    assert len(manifest["files"]["model.lowbit.safetensors"]["sha256"]) == 64
    assert set(manifest["files"]["model.lowbit.safetensors"]["tensors"]) >= {"0.weight", "0.weight_scale"}
    assert manifest["versions"]["torch"] == torch.__version__


@pytest.mark.parametrize("recipe", ["w8a8-dynamic", "w8", "w4-g32", "fp16", "q8_0", "q5_0", "q4_0", "q4_1"])
@pytest.mark.parametrize("factory", [tiny_mlp, tiny_cnn, tied_lm], ids=lambda f: f.__name__)
def test_outputs_after_load_are_bit_identical(tmp_path, recipe, factory):
    model = factory().eval()
    inputs = torch.randint(0, 100, (2, 9)) if factory is tied_lm else (
        torch.randn(3, 3, 8, 8) if factory is tiny_cnn else torch.randn(5, 64))
    quantized = lowbit.quantize(model, recipe)
    folder = lowbit.save(quantized, tmp_path / "model")
    reloaded = lowbit.load(folder, skeleton=factory)
    with torch.inference_mode():
        assert torch.equal(quantized(inputs), reloaded(inputs))


def test_load_in_a_new_process_gives_identical_outputs(saved_mlp, tmp_path):
    quantized, folder = saved_mlp
    x = torch.randn(4, 64)
    save_file({"x": x}, tmp_path / "x.safetensors")
    script = (
        "import sys, torch, lowbit; from safetensors.torch import load_file, save_file;"
        f"m = lowbit.load({str(folder)!r}, trust_code=True);"
        f"x = load_file({str(tmp_path / 'x.safetensors')!r})['x'];"
        f"save_file({{'y': m(x).detach()}}, {str(tmp_path / 'y.safetensors')!r})"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT)
    from safetensors.torch import load_file

    with torch.inference_mode():
        assert torch.equal(load_file(tmp_path / "y.safetensors")["y"], quantized(x))


def test_tied_weights_are_stored_once(tmp_path):
    model = tied_lm().eval()
    folder = lowbit.save(lowbit.quantize(model, "w8", skip=["embed", "head"]), tmp_path / "tied")
    manifest = json.loads((folder / "lowbit.json").read_text())
    assert manifest["aliases"] == {"head.weight": "embed.weight"}
    reloaded = lowbit.load(folder, skeleton=tied_lm)
    assert reloaded.head.weight.data_ptr() == reloaded.embed.weight.data_ptr()


def test_existing_folder_is_not_overwritten_unless_asked(saved_mlp):
    quantized, folder = saved_mlp
    with pytest.raises(FormatError, match="already exists"):
        lowbit.save(quantized, folder)
    assert lowbit.save(quantized, folder, overwrite=True) == folder


def test_failed_write_leaves_no_partial_folder(tmp_path):
    def explode(_folder):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_folder(tmp_path / "out", {"a": torch.zeros(3)}, {}, write_extra=explode)
    assert list(tmp_path.iterdir()) == []


def test_checksum_mismatch_is_refused(saved_mlp):
    _, folder = saved_mlp
    data = bytearray((folder / "model.lowbit.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (folder / "model.lowbit.safetensors").write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="sha256"):
        lowbit.load(folder)


def test_truncated_safetensors_is_refused(saved_mlp):
    _, folder = saved_mlp
    data = (folder / "model.lowbit.safetensors").read_bytes()
    (folder / "model.lowbit.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ChecksumError):
        lowbit.load(folder)


def test_truncated_file_with_matching_checksum_is_still_refused(saved_mlp):
    _, folder = saved_mlp
    data = (folder / "model.lowbit.safetensors").read_bytes()[:100]
    (folder / "model.lowbit.safetensors").write_bytes(data)
    manifest = json.loads((folder / "lowbit.json").read_text())
    from lowbit.formats.members import file_sha256

    manifest["files"]["model.lowbit.safetensors"]["sha256"] = file_sha256(folder / "model.lowbit.safetensors")
    manifest["files"]["model.lowbit.safetensors"]["bytes"] = 100
    (folder / "lowbit.json").write_text(json.dumps(manifest))
    with pytest.raises(FormatError, match="not a readable safetensors"):
        lowbit.load(folder)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda f: (f / "lowbit.json").unlink(), "no lowbit.json"),
        (lambda f: (f / "lowbit.json").write_text("{oops"), "not valid JSON"),
        (lambda f: (f / "lowbit.json").write_text(json.dumps({"format": "lowbit", "format_version": 99})),
         "version 99"),
        (lambda f: (f / "model.lowbit.safetensors").unlink(), "missing"),
    ],
)
def test_broken_folders_give_a_clear_error(saved_mlp, corrupt, message):
    _, folder = saved_mlp
    corrupt(folder)
    with pytest.raises(FormatError, match=message):
        lowbit.load(folder)


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FormatError, match="not a folder"):
        lowbit.load(tmp_path / "nowhere")


def test_plain_module_without_factory_asks_for_a_skeleton(tmp_path):
    quantized = lowbit.quantize(tiny_mlp().eval(), "w8")
    folder = lowbit.save(quantized, tmp_path / "m")
    with pytest.raises(FormatError, match="skeleton"):
        lowbit.load(folder)
    assert lowbit.load(folder, skeleton="tests.fixtures_models:tiny_mlp") is not None


def test_wrong_skeleton_is_a_clear_error(saved_mlp):
    _, folder = saved_mlp
    with pytest.raises(lowbit.LowbitError):
        lowbit.load(folder, skeleton=tiny_cnn)
