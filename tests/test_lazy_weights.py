"""Quantizing a transformers folder module by module from its safetensors shards
(lowbit.quantize_pretrained, and `lowbit quantize` on a folder): the same result as a whole-model
load, and a process whose memory is capped below the float model's size still quantizes it."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import lowbit
from lowbit.errors import ModelLoadError, QuantizationError
from lowbit.families import transformers as hf
from lowbit.families.lazy_weights import LazyWeights, open_lazily
from lowbit.nn import QLinear
from lowbit.transform.quantize import quantized_modules


def _llama(folder, layers, hidden, intermediate, vocab, shard, tied=True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=tied, max_position_embeddings=256)
    LlamaForCausalLM(config).save_pretrained(folder, max_shard_size=shard)
    return folder


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    return _llama(tmp_path_factory.mktemp("sharded"), 3, 64, 128, 500, "100KB")


def _same_state(a, b):
    first, second = a.state_dict(), b.state_dict()
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("recipe", ["w4-g32", "w8", "w8a8-dynamic"])
def test_read_module_by_module_equals_a_whole_load(sharded, recipe):
    assert len(list(sharded.glob("model-*.safetensors"))) > 3
    lazy = lowbit.quantize_pretrained(sharded, recipe, progress=False)
    whole = lowbit.quantize(hf.load_pretrained(sharded), recipe, progress=False)
    assert _same_state(lazy, whole)
    assert lazy.lowbit_source == whole.lowbit_source  # the same source digest, read a tensor at a time
    assert lazy.lm_head.weight is lazy.model.embed_tokens.weight  # tied: stored once
    ids = torch.randint(0, 500, (2, 11))
    with torch.inference_mode():
        assert torch.equal(lazy(ids).logits, whole(ids).logits)


def test_a_real_bert_checkpoint_with_a_saved_buffer_reads_as_a_whole_load_does(minilm):
    model, _, path = minilm  # its file holds embeddings.position_ids, a buffer transformers ignores
    lazy = lowbit.quantize_pretrained(path, "w8a8-dynamic", progress=False)
    whole = lowbit.quantize(model, "w8a8-dynamic", progress=False)
    assert _same_state(lazy, whole) and lazy.lowbit_source == whole.lowbit_source


def test_gptq_reads_one_block_at_a_time_and_equals_a_whole_load(sharded):
    calibration = [torch.randint(0, 500, (2, 96), generator=torch.Generator().manual_seed(seed))
                   for seed in range(2)]
    model, weights = open_lazily(sharded)
    seen = []
    load = weights.load
    weights.load = lambda modules: (seen.append(list(modules)), load(modules))
    lazy = lowbit.quantize(model, "w4-gptq", calibration=calibration, weights=weights, progress=False)
    whole = lowbit.quantize(hf.load_pretrained(sharded), "w4-gptq", calibration=calibration, progress=False)
    assert _same_state(lazy, whole)
    blocks = [modules for modules in seen if modules and modules[0].startswith("model.layers.")
              and modules[0].count(".") == 2]
    assert blocks == [["model.layers.0"], ["model.layers.1"], ["model.layers.2"]]
    assert not any(parameter.is_meta for parameter in lazy.parameters())


def test_an_untied_lm_head_is_rounded_by_gptq_after_the_blocks_lazily_as_whole(tmp_path):
    """Outside the blocks, an untied LM head reads the final hidden states: GPTQ rounds it in one
    more pass of the model (its blocks quantized), read lazily or whole alike."""
    folder = _llama(tmp_path / "untied", 2, 64, 128, 300, "100KB", tied=False)
    calibration = [torch.randint(0, 300, (2, 96), generator=torch.Generator().manual_seed(seed))
                   for seed in range(2)]
    model, weights = open_lazily(folder)
    lazy = lowbit.quantize(model, "w4-gptq", calibration=calibration, weights=weights, progress=False)
    whole = lowbit.quantize(hf.load_pretrained(folder), "w4-gptq", calibration=calibration, progress=False)
    assert _same_state(lazy, whole)
    nearest = lowbit.quantize(hf.load_pretrained(folder), "w4-g64", progress=False)
    assert not torch.equal(whole.lm_head.weight, nearest.lm_head.weight)  # GPTQ's, not round-to-nearest's
    assert torch.equal(whole.model.embed_tokens.weight, nearest.model.embed_tokens.weight)  # a table


def _resident_quantized_bytes(model) -> int:
    return sum(buffer.numel() * buffer.element_size() for module in quantized_modules(model).values()
               for buffer in module.buffers() if not buffer.is_meta)


@pytest.mark.parametrize("recipe", ["w4-g32", "q4_1", "w4-hqq"])
def test_the_folder_is_written_shard_by_shard_while_quantizing(tmp_path, monkeypatch, recipe):
    sharded = _llama(tmp_path / "deep", 6, 64, 128, 100, "100KB")  # a small vocabulary: blocks dominate
    resident = []
    read = LazyWeights.load

    def reading(self, modules):  # what the model holds in quantized tensors as each module is read
        resident.append(_resident_quantized_bytes(self.model))
        return read(self, modules)

    monkeypatch.setattr(LazyWeights, "load", reading)
    folder = lowbit.quantize_pretrained(sharded, recipe, out=tmp_path / "streamed", max_shard_bytes=4096,
                                        progress=False)
    monkeypatch.undo()
    whole = lowbit.quantize_pretrained(sharded, recipe, progress=False)
    assert _same_state(lowbit.load(folder), whole)
    saved = lowbit.save(whole, tmp_path / "saved", runtime="torch")
    streamed, expected = (json.loads((f / "lowbit.json").read_text()) for f in (folder, saved))
    del streamed["files"], expected["files"]
    assert streamed == expected  # the same manifest but for how the tensors split into files
    assert len(list(folder.glob("model.lowbit-*.safetensors"))) > 5
    # held at any time: the tied embedding and LM head (kept to the end, then stored once), a shard
    # not yet full and the module just made; never the quantized model
    modules = {name: _resident_quantized_bytes(nn.Sequential(module))
               for name, module in quantized_modules(whole).items()}
    tied = modules["model.embed_tokens"] + modules["lm_head"]
    assert max(resident) <= tied + 4096 + max(modules.values()) < sum(modules.values()) / 2


def test_writing_while_quantizing_refuses_a_calibrated_recipe_and_writes_nothing(sharded, tmp_path):
    with pytest.raises(QuantizationError, match="data-free recipes"):
        lowbit.quantize_pretrained(sharded, "w4-gptq", out=tmp_path / "out", progress=False)
    assert not list(tmp_path.iterdir())


def test_a_failure_while_writing_shard_by_shard_leaves_nothing(sharded, tmp_path, monkeypatch):
    def failing(*args, **kwargs):
        raise QuantizationError("planted failure")

    monkeypatch.setattr(QLinear, "from_float", failing)
    with pytest.raises(QuantizationError, match="planted"):
        lowbit.quantize_pretrained(sharded, "w8", out=tmp_path / "out", max_shard_bytes=4096, progress=False)
    assert not list(tmp_path.iterdir())


def test_a_checkpoint_under_older_names_is_loaded_whole_and_still_written(tmp_path):
    """Names without the `model.` prefix, which transformers' own loader maps: read module by
    module is not possible, so the model is loaded whole (a warning says so), and saved."""
    from safetensors.torch import load_file, save_file

    folder = _llama(tmp_path / "older", 2, 64, 128, 300, "10MB")
    path = folder / "model.safetensors"
    renamed = {key.removeprefix("model."): value for key, value in load_file(path).items()}
    save_file(renamed, path, metadata={"format": "pt"})
    with pytest.warns(lowbit.LowbitWarning, match="loading the whole model instead"):
        written = lowbit.quantize_pretrained(folder, "w8", out=tmp_path / "out", progress=False)
    expected = lowbit.quantize(hf.load_pretrained(folder), "w8", progress=False)
    assert _same_state(lowbit.load(written), expected)


def test_a_checkpoint_missing_a_tensor_is_refused(sharded, tmp_path):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in sharded.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="model.layers.1.mlp.up_proj.weight"):
        open_lazily(broken)


def test_a_truncated_shard_is_refused(sharded, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in sharded.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    last = sorted(broken.glob("model-*.safetensors"))[-1]
    last.write_bytes(last.read_bytes()[:-100])
    with pytest.raises(ModelLoadError, match="not a readable safetensors file"):
        lowbit.quantize_pretrained(broken, "w8", progress=False)


# Quantizes a folder in a process whose address space is capped at what it uses after a warm-up
# run (imports, first kernels) plus BUDGET bytes: the float model does not fit in that budget.
CAPPED = textwrap.dedent("""
    import resource, sys, traceback
    import torch
    import lowbit
    from lowbit.families import transformers as hf
    torch.set_num_threads(1)
    warm, big, out, mode, budget = sys.argv[1:6]

    def run(folder, target):
        if mode == "stream":  # written shard by shard as it is quantized
            lowbit.quantize_pretrained(folder, "w4-g64", out=target, max_shard_bytes=4 << 20, progress=False)
            return
        if mode == "lazy":
            model = lowbit.quantize_pretrained(folder, "w4-g64", progress=False)
        else:
            model = lowbit.quantize(hf.load_pretrained(folder), "w4-g64", inplace=True, progress=False)
        lowbit.save(model, target, runtime="torch")

    run(warm, out + "-warm")
    run(warm, out + "-warm-again")  # whatever a first run sets up lazily is set up by now
    size = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (size + int(budget), resource.RLIM_INFINITY))
    try:
        run(big, out)
    except Exception as error:  # a MemoryError, or one that wraps a failed allocation or mmap
        if isinstance(error, MemoryError) or "Cannot allocate memory" in repr(error.__cause__ or error):
            traceback.print_exc()  # where the cap was met, for a run that should have fitted
            sys.exit(3)
        raise
""")


def test_a_model_larger_than_the_memory_cap_is_quantized_shard_by_shard(tmp_path):
    # 8 blocks of hidden 512: 36M parameters, 143 MB in float32, in 20 MB shards; the cap leaves
    # 90% of that over what a warm-up on a one-block model left the process using. A whole load
    # fails up to 110% here; shard by shard needs about 50 MB (the quantized model takes a sixth,
    # a shard is read at a time), and the rest is margin for a host whose first uses of kernels or
    # threads in the big run reserve more address space (60% failed once in CI)
    big = _llama(tmp_path / "big", 8, 512, 2048, 8192, "20MB")
    warm = _llama(tmp_path / "warm", 1, 512, 2048, 8192, "20MB")
    budget = sum(path.stat().st_size for path in big.glob("*.safetensors")) * 9 // 10

    def capped(mode):  # one at a time: under CPU contention a run's address space grew more
        command = [sys.executable, "-c", CAPPED, str(warm), str(big), str(tmp_path / mode), mode, str(budget)]
        return subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "MALLOC_ARENA_MAX": "1"}, timeout=300)

    runs = {mode: capped(mode) for mode in ("whole", "lazy", "stream")}
    assert runs["whole"].returncode == 3, runs["whole"].stderr[-2000:]  # the cap is real: a whole load fails
    assert runs["lazy"].returncode == 0, runs["lazy"].stderr[-2000:]
    assert runs["stream"].returncode == 0, runs["stream"].stderr[-2000:]
    expected = lowbit.quantize_pretrained(big, "w4-g64", progress=False)
    assert _same_state(lowbit.load(tmp_path / "lazy"), expected)
    assert _same_state(lowbit.load(tmp_path / "stream"), expected)
