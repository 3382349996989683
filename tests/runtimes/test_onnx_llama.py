"""Llama-architecture causal LMs on the ONNX Runtime runtime: the graph's logits, its cache and its
generate() give what the transformers model and lowbit's reference kernels give."""

import numpy as np
import pytest
import torch

import lowbit
from lowbit.errors import LowbitError
from lowbit.runtimes import onnxruntime as ort_runtime
from lowbit.runtimes.onnx_generate import OnnxCausalLM
from tests.fixtures_models import tiny_llama
from tests.runtimes.test_onnxruntime import _reference_kernels


def _in_onnxruntime(model):
    return ort_runtime.wrap(ort_runtime.session(ort_runtime.export(model), threads=1), model.config)


@pytest.fixture(params=[None, "w4-g32", "w8", "q4_0", "q5_0", "q8_0"])
def models(request):
    model = tiny_llama()
    if request.param is not None:
        model = _reference_kernels(lowbit.quantize(model, request.param, progress=False))
    return model, _in_onnxruntime(model)


def test_logits_of_every_position_equal_the_models(models):
    model, onnx = models
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = model(input_ids=ids).logits
    assert isinstance(onnx, OnnxCausalLM)
    assert torch.allclose(onnx(ids).logits, expected, atol=1e-5, rtol=1e-4)


def test_greedy_generate_gives_the_tokens_transformers_gives(models):
    model, onnx = models
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                  do_sample=False, pad_token_id=0)
    assert torch.equal(onnx.generate(ids, max_new_tokens=12), expected)


def test_sampling_is_reproducible_and_stops_at_end_of_sequence():
    onnx = _in_onnxruntime(tiny_llama())
    ids = torch.randint(0, 64, (1, 4), generator=torch.Generator().manual_seed(2))

    def sample(seed):
        return onnx.generate(ids, max_new_tokens=8, do_sample=True, temperature=0.7, top_k=20, top_p=0.9,
                             generator=torch.Generator().manual_seed(seed))
    assert torch.equal(sample(0), sample(0)) and sample(0).shape == (1, 12)
    greedy = onnx.generate(ids, max_new_tokens=8)
    stop = int(greedy[0, 6])  # the third new token
    stopped = onnx.generate(ids, max_new_tokens=8, eos_token_id=stop)
    assert stopped.shape[1] <= 7 and int(stopped[0, -1]) == stop


def test_padded_prompts_are_refused_with_a_way_out():
    onnx = _in_onnxruntime(tiny_llama())
    ids = torch.ones((2, 4), dtype=torch.long)
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    with pytest.raises(LowbitError, match="runtime='torch'"):
        onnx.generate(ids, attention_mask=mask)


def test_a_saved_causal_lm_loads_into_onnxruntime(tmp_path):
    quantized = lowbit.quantize(tiny_llama(), "w4-g32", progress=False)
    folder = lowbit.save(quantized, tmp_path / "lm", runtime="onnxruntime")
    loaded = lowbit.load(folder)
    assert isinstance(loaded, OnnxCausalLM)
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        reference = _reference_kernels(quantized)
        expected = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                      do_sample=False, pad_token_id=0)
    assert torch.equal(loaded.generate(ids, max_new_tokens=6), expected)
    assert np.isfinite(loaded(ids).logits.numpy()).all()


def test_generation_speed_of_an_onnx_causal_lm_is_measured_through_its_generate():
    from lowbit.evaluate.latency import generation_speed

    speed = generation_speed(_in_onnxruntime(tiny_llama()), torch.randint(0, 64, (1, 12)), new_tokens=4)
    assert speed["decode_tokens_per_second"] > 0 and speed["prefill_tokens_per_second"] > 0
