"""A (tiny, random) Llama-architecture causal LM end to end: tied embeddings, rotary buffers,
meta-device reload, perplexity with sliding windows, and generation speed."""

import pytest
import torch

import lowbit
from lowbit.data import assets
from lowbit.families import transformers as hf
from lowbit.formats.lowbit_format import read_manifest
from tests.fixtures_models import tiny_llama


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory, minilm):
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tokenizer, _ = minilm
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=True, max_position_embeddings=256)
    folder = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_causal_lm_reloads_bit_identical_from_its_folder(llama_folder, tmp_path):
    quantized = lowbit.quantize(hf.load_pretrained(llama_folder), "w8a8-dynamic")
    reloaded = lowbit.load(lowbit.save(quantized, tmp_path / "q", runtime="torch"))
    ids = torch.randint(0, 1000, (2, 17))
    with torch.inference_mode():
        assert torch.equal(quantized(ids).logits, reloaded(ids).logits)


@pytest.mark.parametrize("recipe", ["w8", "w4-g32", "w8a8-dynamic"])
def test_tied_embedding_and_head_share_one_quantized_copy(llama_folder, tmp_path, recipe):
    quantized = lowbit.quantize(hf.load_pretrained(llama_folder), recipe, progress=False)
    embedding, head = quantized.model.embed_tokens, quantized.lm_head
    assert head.weight is embedding.weight and head.weight_scale is embedding.weight_scale
    folder = lowbit.save(quantized, tmp_path / "tied", runtime="torch")
    aliases = read_manifest(folder)["aliases"]
    assert {"lm_head.weight", "model.embed_tokens.weight"} & set(aliases)
    reloaded = lowbit.load(folder)
    ids = torch.randint(0, 1000, (1, 9))
    with torch.inference_mode():
        assert torch.equal(quantized(ids).logits, reloaded(ids).logits)


def test_a_head_quantized_differently_from_its_embedding_keeps_its_own_copy(llama_folder):
    quantized = lowbit.quantize(hf.load_pretrained(llama_folder), "w8", overrides={"lm_head": "w4-g32"},
                                progress=False)
    assert quantized.lm_head.weight is not quantized.model.embed_tokens.weight
    assert quantized.lm_head.weight.shape != quantized.model.embed_tokens.weight.shape


def test_compare_measures_perplexity_and_generation_speed(llama_folder, tmp_path):
    quantized = lowbit.save(lowbit.quantize(hf.load_pretrained(llama_folder), "w8"), tmp_path / "q")
    text = tmp_path / "wiki.txt"
    text.write_text("\n".join(assets.wikipedia_sentences(30)))
    comparison = lowbit.compare(llama_folder, quantized, text, seq_len=64, runs=2, memory=False,
                                progress=False)
    assert comparison.settings["kind"] == "causal_lm" and comparison.metric == "perplexity"
    entry = comparison.quality["perplexity"]
    assert 1.0 < entry["original"] < float("inf") and entry["ci95"][0] <= entry["delta"] <= entry["ci95"][1]
    assert comparison.quantized["generation"]["decode_tokens_per_second"] > 0


def test_tune_on_a_causal_lm_budgets_perplexity_relatively(llama_folder, tmp_path):
    text = tmp_path / "wiki.txt"
    text.write_text("\n".join(assets.wikipedia_sentences(20)))
    result = lowbit.tune(llama_folder, text, metric="perplexity", max_drop=0.01, relative=True,
                         candidates=["w8", "fp16"], seq_len=64, final_comparison=False, progress=False)
    assert result.metric == "perplexity" and result.met_budget
    trial = result.trials[0]
    assert trial.quality > 1.0 and abs(trial.drop) <= 0.01
    assert trial.drop == pytest.approx(trial.quality / result.original_quality - 1.0)


def test_the_generation_config_is_saved_and_loaded(tmp_path):
    """Stop tokens and sampling defaults travel with the folder, checksummed like config.json."""
    model = tiny_llama()
    model.generation_config.eos_token_id = [5, 7]
    model.generation_config.max_new_tokens = 9
    folder = lowbit.save(lowbit.quantize(model, "w8", progress=False), tmp_path / "q", runtime="torch")
    loaded = lowbit.load(folder)
    assert loaded.generation_config.eos_token_id == [5, 7] and loaded.generation_config.max_new_tokens == 9
    (folder / "generation_config.json").write_text('{"max_new_tokens": 90}')
    with pytest.raises(lowbit.LowbitError):
        lowbit.load(folder)
