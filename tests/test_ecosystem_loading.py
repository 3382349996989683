"""A lowbit folder of the real all-MiniLM-L6-v2 loads right through transformers and
sentence-transformers once lowbit is imported, and is refused (never loaded as garbage) when
it is not (lowbit.families.hf_quantizer)."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import lowbit
from lowbit.errors import LowbitError
from lowbit.nn import QLinear

SENTENCES = ["The cat sat on the mat.", "Quantization makes models smaller and faster.",
             "Paris is the capital of France.", "A quiet afternoon in the library."]


@pytest.fixture(scope="module")
def folder(minilm, tmp_path_factory):
    model, _, _ = minilm
    return lowbit.save(lowbit.quantize(model, "w8a8-dynamic"), tmp_path_factory.mktemp("eco") / "minilm-w8a8",
                       runtime="torch")


def test_automodel_returns_the_model_lowbit_load_returns(folder):
    from transformers import AutoModel

    through_transformers = AutoModel.from_pretrained(folder)
    through_lowbit = lowbit.load(folder)
    assert isinstance(through_transformers.encoder.layer[0].attention.self.query, QLinear)
    inputs = {"input_ids": torch.tensor([[101, 1996, 4937, 2938, 2006, 1996, 13523, 1012, 102]])}
    with torch.inference_mode():
        expected = through_lowbit(**inputs).last_hidden_state
        got = through_transformers(**inputs).last_hidden_state
    assert torch.equal(got, expected)


def test_sentence_transformer_gives_normalized_embeddings_close_to_the_original(folder, minilm):
    from sentence_transformers import SentenceTransformer

    _, _, source = minilm
    quantized = SentenceTransformer(str(folder), device="cpu").encode(SENTENCES, convert_to_tensor=True)
    original = SentenceTransformer(str(source), device="cpu").encode(SENTENCES, convert_to_tensor=True)
    assert torch.allclose(quantized.norm(dim=1), torch.ones(len(SENTENCES)), atol=1e-5)
    assert torch.nn.functional.cosine_similarity(quantized, original).min() >= 0.995


def test_a_tampered_tensor_file_is_refused_through_transformers_too(folder, tmp_path):
    import shutil

    from transformers import AutoModel

    copy = shutil.copytree(folder, tmp_path / "copy")
    data = bytearray((copy / "model.lowbit.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (copy / "model.lowbit.safetensors").write_bytes(bytes(data))
    with pytest.raises(LowbitError, match="sha256"):
        AutoModel.from_pretrained(copy)


def test_without_lowbit_transformers_refuses_and_with_it_loads(folder):
    """In a fresh interpreter: before `import lowbit`, from_pretrained fails naming lowbit;
    importing lowbit after transformers is enough for the same call to work."""
    script = textwrap.dedent(f"""
        from transformers import AutoModel
        try:
            AutoModel.from_pretrained({str(folder)!r})
        except OSError as error:
            print("refused:", error)
        else:
            print("loaded without lowbit")
        import lowbit
        model = AutoModel.from_pretrained({str(folder)!r})
        print("loaded:", type(model.encoder.layer[0].output.dense).__name__)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "refused:" in result.stdout and "install-and-import-lowbit" in result.stdout
    assert "loaded: QLinear" in result.stdout


def test_saved_config_carries_no_path_of_the_build_machine(folder, minilm):
    _, _, source = minilm
    for name in ("config.json", "lowbit.json"):
        text = (folder / name).read_text()
        assert str(source) not in text and str(folder.parent) not in text
    config = json.loads((folder / "config.json").read_text())
    assert "_name_or_path" not in config
    assert config["quantization_config"]["quant_method"] == "lowbit"


def test_sentence_transformers_files_are_kept_and_checksummed(folder):
    manifest = json.loads((folder / "lowbit.json").read_text())
    for name in ("modules.json", "sentence_bert_config.json", "1_Pooling/config.json"):
        assert (folder / name).is_file()
        assert name in manifest["files"]


@pytest.mark.parametrize("recipe", ["w8", "w4-g32"])
def test_causal_lm_with_tied_embeddings_loads_through_automodelforcausallm(tmp_path, recipe):
    """The LM head shares the embedding's codes and scales (lowbit's aliases): transformers must
    not treat the head's scales as missing, and AutoModel must leave the head out."""
    from transformers import AutoModel, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    folder = lowbit.save(lowbit.quantize(LlamaForCausalLM(config).eval(), recipe), tmp_path / "lm",
                         runtime="torch")
    tokens = torch.tensor([[1, 17, 42, 99, 3]])
    with torch.inference_mode():
        expected = lowbit.load(folder)(tokens).logits
        got = AutoModelForCausalLM.from_pretrained(folder)(tokens).logits
        base = AutoModel.from_pretrained(folder)(tokens).last_hidden_state
    assert torch.equal(got, expected)
    assert base.shape == (1, 5, 64)


def test_tied_float_embeddings_stay_tied_through_transformers(tmp_path):
    """Embeddings and LM head kept in float while the rest is quantized: transformers' own tie
    must survive, or the head would come back randomly initialised."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    recipe = lowbit.Recipe(**{**lowbit.PRESETS["w8"], "embeddings": False, "skip": ("lm_head",)})
    folder = lowbit.save(lowbit.quantize(LlamaForCausalLM(config).eval(), recipe), tmp_path / "lm",
                         runtime="torch")
    tokens = torch.tensor([[1, 17, 42, 99, 3]])
    with torch.inference_mode():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(folder)(tokens).logits,
                           lowbit.load(folder)(tokens).logits)


@pytest.mark.parametrize("weights", ["other.safetensors", "../elsewhere/model.lowbit.safetensors",
                                     "model.lowbit.safetensors.index.json"])
def test_a_config_cannot_point_transformers_at_other_tensors(folder, tmp_path, weights):
    import shutil

    from transformers import AutoModel

    copy = shutil.copytree(folder, tmp_path / "copy")
    config = json.loads((copy / "config.json").read_text())
    config["quantization_config"]["weights"] = weights
    (copy / "config.json").write_text(json.dumps(config))  # not re-signed: refused before that check
    with pytest.raises(LowbitError, match="model.lowbit.safetensors"):
        AutoModel.from_pretrained(copy)
