"""A causal LM in an ONNX Runtime session: logits like transformers' `forward`, and `generate` with
the key/value cache carried from step to step inside ONNX Runtime's buffers.

`generate` takes what transformers' `generate` takes for plain decoding (`max_new_tokens`,
`do_sample`, `temperature`, `top_k`, `top_p`, `eos_token_id`) and returns the prompt and the new
tokens, as transformers does. The cache stays in ONNX Runtime's own buffers (OrtValues bound to
the next step's inputs): nothing is copied out to numpy between tokens. Prompts of one batch must
have the same length (no padding).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lowbit.errors import LowbitError
from lowbit.runtimes.onnx_session import OnnxRuntimeModel

PAST, PRESENT = "past_key_values.", "present."


class OnnxCausalLM(OnnxRuntimeModel):
    """A Llama-style causal LM exported by lowbit.runtimes.onnx_llama."""

    def __init__(self, session_: Any, config: Any = None) -> None:
        super().__init__(session_, config)
        self.past_names = [name for name in self.input_names if name.startswith(PAST)]
        shapes = {value.name: value.shape for value in session_.get_inputs()}
        self.cache_shape = shapes[self.past_names[0]] if self.past_names else None  # batch, heads, past, size

    def _empty_cache(self, batch: int) -> dict[str, np.ndarray]:
        _, heads, _, size = self.cache_shape
        return {name: np.zeros((batch, heads, 0, size), np.float32) for name in self.past_names}

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
        binding = self.session.io_binding()
        feeds = {"input_ids": prompt, "attention_mask": np.ones((batch, length), np.int64),
                 **self._empty_cache(batch)}
        tokens = [prompt]
        for _ in range(max_new_tokens):
            for name, value in feeds.items():
                binding.bind_cpu_input(name, value) if isinstance(value, np.ndarray) else \
                    binding.bind_ortvalue_input(name, value)
            for name in self.output_names:
                binding.bind_output(name)
            self.session.run_with_iobinding(binding)
            outputs = dict(zip(self.output_names, binding.get_outputs(), strict=True))
            logits = outputs["logits"].numpy()[:, -1, :]
            chosen = _sample(logits, temperature, top_k, top_p, generator) if do_sample else logits.argmax(-1)
            chosen = np.where(finished, pad, chosen)
            tokens.append(chosen.astype(np.int64)[:, None])
            finished |= np.isin(chosen, stops)
            if finished.all():
                break
            length += 1
            feeds = {"input_ids": tokens[-1], "attention_mask": np.ones((batch, length), np.int64),
                     **{name: outputs[PRESENT + name.removeprefix(PAST)] for name in self.past_names}}
            binding.clear_binding_inputs()
            binding.clear_binding_outputs()
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
