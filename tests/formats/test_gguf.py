"""GGUF export for llama.cpp: lowbit's integers and float16 scales (and Q4_1's float16 minimums)
land in Q8_0/Q5_0/Q4_0/Q4_1 blocks unchanged (the gguf package's dequantizer gives exactly
lowbit's weights), the tokenizer and metadata are complete enough for llama.cpp to load the file
and compute lowbit's logits, and what GGUF cannot hold is refused by name with nothing written."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import lowbit
from lowbit.cli import app
from lowbit.data import assets
from lowbit.families import transformers as hf
from lowbit.formats.gguf_file import GGUFError, export_gguf

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    """A tiny random Llama with a byte-level BPE tokenizer trained on real Wikipedia text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(assets.wikipedia_sentences(200), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>",
                                        eos_token="<|endoftext|>")
    tokenizer.chat_template = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=bpe.get_vocab_size(), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=True, max_position_embeddings=256, bos_token_id=0,
                         eos_token_id=0)
    folder = tmp_path_factory.mktemp("llama-bpe")
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _calibration(count=4):
    generator = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 200, (2, 32), generator=generator)} for _ in range(count)]


def _rotary_rows(rows: int, heads: int) -> np.ndarray:
    """llama.cpp's row order of a Q or K projection (see lowbit.formats.gguf_file)."""
    return np.arange(rows).reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(-1)


def _read_back(path) -> dict[str, torch.Tensor]:
    reader = gguf.GGUFReader(path)
    weights = {}
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        weights[tensor.name] = torch.from_numpy(np.array(values, dtype=np.float32)).reshape(
            [int(n) for n in reversed(tensor.shape)])
    return weights


@pytest.mark.parametrize(("recipe", "block"), [("q4_0", "Q4_0"), ("q5_0", "Q5_0"), ("q8_0", "Q8_0"),
                                              ("q4_0-awq-gptq", "Q4_0"), ("q4_1", "Q4_1"),
                                              ("q4_1-gptq", "Q4_1")])
def test_the_file_holds_exactly_lowbits_dequantized_weights(llama_folder, tmp_path, recipe, block):
    calibration = _calibration() if "gptq" in recipe else None
    quantized = lowbit.quantize(hf.load_pretrained(llama_folder), recipe, calibration=calibration,
                                progress=False)
    path = tmp_path / "model.gguf"
    export_gguf(quantized, llama_folder, path)
    weights = _read_back(path)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.ffn_down.weight"] == block and types["token_embd.weight"] == "Q8_0"
    assert "output.weight" not in types  # the tied head is the embedding, held once
    heads = {"q_proj": 4, "k_proj": 2}
    layer = quantized.model.layers[1]
    for name, module in [("q_proj", layer.self_attn.q_proj), ("k_proj", layer.self_attn.k_proj),
                         ("down", layer.mlp.down_proj), ("embed", quantized.model.embed_tokens)]:
        expected = module.dequantized_weight()
        if name in heads:
            expected = expected[_rotary_rows(expected.shape[0], heads[name])]
        target = {"q_proj": "blk.1.attn_q.weight", "k_proj": "blk.1.attn_k.weight",
                  "down": "blk.1.ffn_down.weight", "embed": "token_embd.weight"}[name]
        assert torch.equal(weights[target], expected), name
    assert torch.equal(weights["blk.1.attn_norm.weight"], layer.input_layernorm.weight.detach())


def test_gguf_recipes_choose_integers_for_float16_scales(llama_folder):
    quantized = lowbit.quantize(hf.load_pretrained(llama_folder), "q4_0", progress=False)
    for module in lowbit.transform.quantize.quantized_modules(quantized).values():
        assert module.spec.scale_dtype == "float16"
        assert torch.equal(module.weight_scale.half().float(), module.weight_scale)
        assert module.loaded_problem() is None
    module.weight_scale.mul_(1 + 2**-20)  # no longer a float16 value: a file that says otherwise is refused
    assert "float16" in module.loaded_problem()


def test_the_metadata_and_tokenizer_are_llamas(llama_folder, tmp_path):
    quantized = lowbit.quantize(hf.load_pretrained(llama_folder), "q4_0", progress=False)
    path = tmp_path / "model.gguf"
    export_gguf(quantized, llama_folder, path)
    fields = gguf.GGUFReader(path).fields
    value = {name: field.contents() for name, field in fields.items()}
    assert value["general.architecture"] == "llama" and value["llama.block_count"] == 2
    assert value["llama.attention.head_count_kv"] == 2 and value["llama.rope.dimension_count"] == 16
    assert value["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q4_0)
    assert value["tokenizer.ggml.model"] == "gpt2" and value["tokenizer.ggml.pre"] == "gpt-2"
    tokens = json.loads((llama_folder / "tokenizer.json").read_text())["model"]["vocab"]
    assert value["tokenizer.ggml.tokens"] == sorted(tokens, key=tokens.get)
    assert len(value["tokenizer.ggml.merges"]) > 0 and value["tokenizer.ggml.eos_token_id"] == 0


# q5_0 with AWQ: its scales folded into the norms and up_proj's rows must reach llama.cpp too
@pytest.mark.parametrize("recipe", ["q8_0", "q5_0", "q4_1", {"preset": "q5_0", "algorithm": "awq"}],
                         ids=["q8_0", "q5_0", "q4_1", "q5_0-awq"])
def test_llama_cpp_loads_the_file_and_computes_lowbits_logits(llama_folder, tmp_path, recipe):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama.cpp is built by `make bench-llamacpp`")
    if isinstance(recipe, dict):
        recipe = lowbit.make_recipe(recipe["preset"], algorithm=recipe["algorithm"])
    calibration = _calibration() if isinstance(recipe, lowbit.Recipe) else None
    quantized = lowbit.quantize(hf.load_pretrained(llama_folder), recipe, calibration=calibration,
                                progress=False)
    path = tmp_path / "model.gguf"
    export_gguf(quantized, llama_folder, path)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, logits_all=True, verbose=False)
    text = "The river flows through 3 towns, north of the capital."
    ids = llm.tokenize(text.encode(), add_bos=False)
    assert ids == hf.load_tokenizer(llama_folder)(text)["input_ids"]  # llama.cpp splits text as transformers
    llm.eval(ids)
    theirs = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
    with torch.inference_mode():
        ours = quantized(torch.tensor([ids])).logits[0]
    # llama.cpp rounds activations to 8 bits per block for its products: close, not equal
    assert torch.allclose(theirs, ours, atol=0.05, rtol=0.05), (theirs - ours).abs().max()
    assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() >= 0.9


def test_weights_gguf_cannot_hold_are_refused_by_module_name(llama_folder, tmp_path):
    quantized = lowbit.quantize(hf.load_pretrained(llama_folder), "w4-g32", progress=False)
    path = tmp_path / "model.gguf"
    with pytest.raises(GGUFError, match=r"^model\.embed_tokens: int4 weights, asymmetric with integer zero "
                                        r"points, have no GGUF block type.*q4_1"):
        export_gguf(quantized, llama_folder, path)
    assert not path.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize(("preset", "changes", "reason"), [
    ("q4_0", {"granularity": "group:64"}, "group:64 weights are not GGUF blocks"),
    ("q4_0", {"scale_dtype": "float32"}, "its scales are not float16 values"),
    ("q4_1", {"scale_dtype": "float32"}, "its scales are not float16 values; its minimums are not float16"),
])
def test_a_group_or_scale_a_gguf_type_does_not_allow_is_refused(llama_folder, tmp_path, preset, changes,
                                                                reason):
    recipe = lowbit.make_recipe(preset, **changes)
    quantized = lowbit.quantize(hf.load_pretrained(llama_folder), recipe, progress=False)
    with pytest.raises(GGUFError, match=rf"^model\.layers\.0\.self_attn\.q_proj: {reason}"):
        export_gguf(quantized, llama_folder, tmp_path / "model.gguf")
    assert not list(tmp_path.iterdir())


def test_a_model_that_is_not_llama_is_refused_with_the_architectures_supported(tmp_path):
    from tests.fixtures_models import tiny_bert

    with pytest.raises(GGUFError, match="supports LlamaForCausalLM; this model is BertModel"):
        export_gguf(lowbit.quantize(tiny_bert(), "q8_0", progress=False), tmp_path, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_the_cli_exports_a_lowbit_folder_and_refuses_one_gguf_cannot_hold(llama_folder, tmp_path):
    runner = CliRunner()
    for recipe in ("q4_0", "w8"):
        folder = lowbit.save(lowbit.quantize(hf.load_pretrained(llama_folder), recipe, progress=False),
                             tmp_path / recipe)
        out = tmp_path / f"{recipe}.gguf"
        result = runner.invoke(app, ["export", str(folder), "--format", "gguf", "--out", str(out)])
        if recipe == "q4_0":
            assert result.exit_code == 0, result.output
            assert "gguf" in result.output and out.is_file()
            fields = gguf.GGUFReader(out).fields  # the lowbit folder kept the chat template
            assert "message['content']" in fields["tokenizer.chat_template"].contents()
            assert fields["general.name"].contents() == "q4_0"
        else:
            assert result.exit_code == 2 and "per_channel" in result.output, result.output
            assert not (tmp_path / "w8.gguf").exists()


def test_the_cli_tunes_scales_and_the_file_still_holds_lowbits_weights(llama_folder, tmp_path):
    runner = CliRunner()
    text = tmp_path / "calibration.txt"
    text.write_text("\n".join(assets.wikipedia_sentences(40)))
    folder, path = tmp_path / "tuned", tmp_path / "tuned.gguf"
    refused = runner.invoke(app, ["quantize", str(llama_folder), "-r", "q4_0", "--tune-steps", "3",
                                  "--out", str(folder)])
    assert refused.exit_code == 2 and "--calibration" in refused.output and not folder.exists()
    refused = runner.invoke(app, ["quantize", str(llama_folder), "-r", "q4_0", "--calibration", str(text),
                                  "--tune-steps", "3", "--max-drop", "0.1", "--data", str(text),
                                  "--out", str(folder)])
    assert refused.exit_code == 2 and "--max-drop" in refused.output and not folder.exists()
    result = runner.invoke(app, ["quantize", str(llama_folder), "-r", "q4_0", "--calibration", str(text),
                                 "--tune-steps", "3", "--runtime", "torch", "--out", str(folder)])
    assert result.exit_code == 0, result.output
    assert "tuned the scales and norms: 3 steps" in result.output
    assert runner.invoke(app, ["export", str(folder), "--format", "gguf", "--out", str(path)]).exit_code == 0
    tuned = lowbit.load(folder)
    assert tuned.lowbit_training["method"] == "scale tuning (distillation)"
    untuned = lowbit.quantize(hf.load_pretrained(llama_folder), "q4_0", progress=False)
    down = tuned.model.layers[0].mlp.down_proj
    assert not torch.equal(down.weight_scale, untuned.model.layers[0].mlp.down_proj.weight_scale)
    assert torch.equal(_read_back(path)["blk.0.ffn_down.weight"], down.dequantized_weight())
