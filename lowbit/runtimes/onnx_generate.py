"""A causal LM in an ONNX Runtime session: logits like transformers' `forward`, and `generate` with
a preallocated key/value cache that ONNX Runtime fills in place.

`generate` takes what transformers' `generate` takes for plain decoding (`max_new_tokens`,
`do_sample`, `temperature`, `top_k`, `top_p`, `eos_token_id`) and returns the prompt and the new
tokens, as transformers does. Each layer's cache is one buffer of prompt + new positions, bound as
both the past input and the present output of every step: GroupQueryAttention appends in place,
nothing is reallocated or copied between tokens. Prompts of one batch must have the same length
(no padding).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from lowbit.errors import LowbitError
from lowbit.runtimes.onnx_session import OnnxRuntimeModel

PAST, PRESENT = "past_key_values.", "present."


class OnnxCausalLM(OnnxRuntimeModel):
    """A Llama-style causal LM exported by lowbit.runtimes.onnx_llama."""

    def __init__(self, session_: Any, config: Any = None, model_bytes: int | None = None) -> None:
        super().__init__(session_, config, model_bytes)
        self.past_names = [name for name in self.input_names if name.startswith(PAST)]
        shapes = {value.name: value.shape for value in session_.get_inputs()}
        self.cache_shape = shapes[self.past_names[0]] if self.past_names else None  # batch, heads, past, size

    def _empty_cache(self, batch: int) -> dict[str, np.ndarray]:
        _, heads, _, size = self.cache_shape
        return {name: np.zeros((batch, heads, 0, size), np.float32) for name in self.past_names}

    def _bind_cache(self, batch: int, length: int) -> Any:
        """An IO binding whose every past and present cache is one preallocated buffer of `length`
        positions: GroupQueryAttention writes each new token's keys and values in place, so no
        cache is reallocated or copied from step to step."""
        import onnxruntime

        positions = int(getattr(self.config, "max_position_embeddings", length) or length)
        if length > positions:
            raise LowbitError(f"prompt and new tokens come to {length}, more than the model's {positions} "
                              "positions")
        _, heads, _, size = self.cache_shape
        shape, binding = (batch, heads, length, size), self.session.io_binding()
        for name in self.past_names:
            # owned by ONNX Runtime, so the binding keeps it alive; only written positions are read
            buffer = onnxruntime.OrtValue.ortvalue_from_shape_and_type(shape, np.float32)
            binding.bind_ortvalue_input(name, buffer)
            binding.bind_ortvalue_output(PRESENT + name.removeprefix(PAST), buffer)
        return binding

    def _step_logits(self, batch: int) -> Any:
        """One (batch, 1, vocabulary) buffer that every step after the prompt writes its logits
        into: reading it costs no new output and no wrapping of the 2 × layers cache outputs."""
        import onnxruntime

        vocabulary = self.session.get_outputs()[self.output_names.index("logits")].shape[-1]
        if not isinstance(vocabulary, int):
            vocabulary = int(self.config.vocab_size)
        return onnxruntime.OrtValue.ortvalue_from_shape_and_type((batch, 1, vocabulary), np.float32)

    def timed_generation(self, input_ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
        """(prefill seconds, seconds for `new_tokens` greedy steps after it), as
        lowbit.evaluate.latency.generation_speed times a PyTorch model."""
        never = -1  # no early stop: exactly `new_tokens` steps are timed
        self.generate(input_ids[:, :8], max_new_tokens=2, eos_token_id=never)  # warm-up
        start = time.perf_counter()
        self.generate(input_ids, max_new_tokens=1, eos_token_id=never)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        self.generate(input_ids, max_new_tokens=new_tokens + 1, eos_token_id=never)
        return prefill, time.perf_counter() - start - prefill

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: Any) -> Any:
        """Logits of every position, with no cache (what perplexity needs)."""
        from transformers.modeling_outputs import CausalLMOutput

        ids = _token_array(input_ids)
        _check_unpadded(attention_mask)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), **self._empty_cache(ids.shape[0])}
        logits = self.session.run(["logits"], feeds)[0]
        return CausalLMOutput(logits=torch.from_numpy(logits))

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int | None = 50, top_p: float = 1.0, eos_token_id: int | list[int] | None = None,
                 pad_token_id: int | None = None, generator: torch.Generator | None = None,
                 **_: Any) -> torch.Tensor:
        """Prompt and new tokens, (batch, prompt + new): greedy, or sampled with temperature, top-k
        and top-p. A row that produced an end-of-sequence token (the config's by default) gets
        `pad_token_id` after it, and decoding stops once every row has, as in transformers."""
        if max_new_tokens < 1:
            raise LowbitError("max_new_tokens must be at least 1")
        _check_unpadded(attention_mask)
        prompt = _token_array(input_ids)
        batch, length = prompt.shape
        if eos_token_id is None:
            eos_token_id = getattr(self.config, "eos_token_id", None)
        stops = [int(token) for token in np.atleast_1d(eos_token_id)] if eos_token_id is not None else []
        pad = pad_token_id if pad_token_id is not None else getattr(self.config, "pad_token_id", None)
        pad = pad if pad is not None else (stops[0] if stops else 0)
        finished = np.zeros(batch, bool)
        binding = self._bind_cache(batch, length + max_new_tokens)
        step_logits = self._step_logits(batch)
        tokens, step = [prompt], prompt
        for index in range(max_new_tokens):
            binding.bind_cpu_input("input_ids", step)
            binding.bind_cpu_input("attention_mask", np.ones((batch, length), np.int64))
            if index == 0:  # the prompt's logits, every position: a fresh output
                binding.bind_output("logits")
            elif index == 1:  # one position from here on: the preallocated buffer
                binding.bind_ortvalue_output("logits", step_logits)
            self.session.run_with_iobinding(binding)
            logits = (binding.get_outputs()[self.output_names.index("logits")] if index == 0
                      else step_logits).numpy()[:, -1, :]
            chosen = _sample(logits, temperature, top_k, top_p, generator) if do_sample else logits.argmax(-1)
            step = np.where(finished, pad, chosen).astype(np.int64)[:, None]
            tokens.append(step)
            finished |= np.isin(step[:, 0], stops)
            if finished.all():
                break
            length += 1
        return torch.from_numpy(np.concatenate(tokens, axis=1))


def _token_array(ids: torch.Tensor) -> np.ndarray:
    array = ids.detach().cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
    if array.ndim != 2 or array.dtype.kind not in "iu":
        raise LowbitError(f"input_ids must be a (batch, tokens) array of integers, not {array.dtype} "
                          f"{tuple(array.shape)}")
    return array.astype(np.int64, copy=False)


def _check_unpadded(attention_mask: torch.Tensor | None) -> None:
    if attention_mask is not None and not bool((attention_mask != 0).all()):
        raise LowbitError("the ONNX Runtime causal LM takes prompts of one length without padding; "
                          "run padded batches with lowbit.load(path, runtime='torch')")


def _sample(logits: np.ndarray, temperature: float, top_k: int | None, top_p: float,
            generator: torch.Generator | None) -> np.ndarray:
    """One token per row from softmax(logits / temperature), kept to the top-k tokens and the
    smallest set whose probability reaches top-p, as transformers' warpers do."""
    scores = torch.from_numpy(logits).float() / max(temperature, 1e-5)
    if top_k:
        kth = torch.topk(scores, min(top_k, scores.shape[-1])).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = torch.sort(scores, descending=True)
        cumulative = ordered.softmax(-1).cumsum(-1)
        drop = cumulative - ordered.softmax(-1) >= top_p  # keep the first token past top_p
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(-1).numpy()
