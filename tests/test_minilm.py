"""The foundation's promises on the real all-MiniLM-L6-v2 and real Wikipedia sentences."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.evaluate import folder_bytes, mean_cosine
from lowbit.families import transformers as hf
from lowbit.nn import QLinear
from lowbit.nn.kernels import KERNELS

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def fp32_embeddings(minilm, wiki_sentences):
    model, tokenizer, _ = minilm
    return hf.embed(model, tokenizer, wiki_sentences, batch_size=1)


@pytest.fixture(scope="module")
def saved(minilm, tmp_path_factory):
    """Each recipe quantized once and saved; shared by the checks below."""
    model, _, _ = minilm
    folders = {}
    for name, recipe in {"w8a8-dynamic": "w8a8-dynamic", "w4": "w4", "w4-g32": "w4-g32"}.items():
        quantized = lowbit.quantize(model, recipe)
        folder = lowbit.save(quantized, tmp_path_factory.mktemp("q") / name, runtime="torch")
        folders[name] = (quantized, folder)
    return folders


@pytest.mark.parametrize("recipe, minimum", [("w8a8-dynamic", 0.995), ("w4", 0.95), ("w4-g32", 0.97)])
def test_embedding_cosine_to_fp32_on_256_wikipedia_sentences(saved, minilm, wiki_sentences,
                                                             fp32_embeddings, recipe, minimum):
    _, tokenizer, _ = minilm
    quantized, _ = saved[recipe]
    embeddings = hf.embed(quantized, tokenizer, wiki_sentences, batch_size=1)
    assert mean_cosine(fp32_embeddings, embeddings) >= minimum


@pytest.mark.parametrize("recipe, factor", [("w8a8-dynamic", 3.5), ("w4", 5.0)])
def test_saved_folder_is_smaller_than_the_fp32_safetensors(saved, minilm, recipe, factor):
    _, _, path = minilm
    assert folder_bytes(path / "model.safetensors") / folder_bytes(saved[recipe][1]) >= factor


def test_w8a8_dynamic_runs_int8_kernels_for_a_short_sentence(saved):
    quantized, _ = saved["w8a8-dynamic"]
    linears = [m for m in quantized.modules() if isinstance(m, QLinear)]
    assert len(linears) == 37
    assert sum(m.spec.kernels["32"] == "fbgemm_dynamic" for m in linears) >= len(linears) // 2


def record_linear_inputs(model, tokenizer, texts) -> dict[str, torch.Tensor]:
    """The 2-D input each QLinear sees when the model embeds `texts`."""
    inputs = {}

    def record(name):
        def hook(module, args, output):
            inputs.setdefault(name, args[0].reshape(-1, args[0].shape[-1]))

        return hook

    hooks = [m.register_forward_hook(record(n))
             for n, m in model.named_modules() if isinstance(m, QLinear)]
    with torch.inference_mode():
        model(**hf.tokenize(tokenizer, texts))
    for hook in hooks:
        hook.remove()
    return inputs


def test_fast_kernels_match_the_reference_on_real_activations(saved, minilm, wiki_sentences):
    """Real activations (outlier channels included) through every int8/int4 path vs the reference."""
    _, tokenizer, _ = minilm
    for recipe in ("w8a8-dynamic", "w4"):
        quantized, _ = saved[recipe]
        inputs = record_linear_inputs(quantized, tokenizer, wiki_sentences[:2])
        for name, x in inputs.items():
            module = quantized.get_submodule(name)
            expected = KERNELS["reference"](module, x)
            for kernel in set(module.spec.kernels.values()) - {"reference", "dequantized_fp32"}:
                error = (KERNELS[kernel](module, x) - expected).norm() / expected.norm()
                # fbgemm's vectorised rounding of near-tie activations differs from the reference's
                # by one step on a few elements (1.4e-4 seen with AVX-512 VNNI); int16 saturation
                # would show as 0.065 or more (../shared/KERNELS.md).
                assert error < (1e-3 if kernel == "fbgemm_dynamic" else 1e-2), (name, kernel)


def test_transformers_folder_loads_alone_in_a_new_process_with_identical_outputs(saved, minilm, tmp_path):
    model, tokenizer, _ = minilm
    quantized, folder = saved["w8a8-dynamic"]
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    script = (
        "import sys, lowbit, torch; from lowbit.families import transformers as hf;"
        "from safetensors.torch import save_file;"
        "m = lowbit.load(sys.argv[1]); t = hf.load_tokenizer(sys.argv[1]);"
        "save_file({'y': hf.embed(m, t, sys.argv[3:], 2)}, sys.argv[2])"
    )
    texts = ["A first sentence.", "And a second, longer one here."]
    out = tmp_path / "y.safetensors"
    subprocess.run([sys.executable, "-c", script, str(folder), str(out), *texts], check=True, cwd=ROOT)
    from safetensors.torch import load_file

    expected = hf.embed(quantized, tokenizer, texts, 2)
    assert torch.equal(load_file(out)["y"], expected)
