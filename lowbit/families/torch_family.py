"""The torch family: PyTorch and transformers models from a transformers folder, a lowbit folder,
a `package.module:factory` spec or an in-memory module; compared and benchmarked with
lowbit.evaluate.compare, with size on disk, load time and peak RSS measured here."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from lowbit.data.batches import call_model, tokenize
from lowbit.errors import LowbitError
from lowbit.evaluate.compare_models import DEFAULT_TEXT, FileMeasure, Settings, bench_model, compare_models
from lowbit.evaluate.metrics import is_finite
from lowbit.families import transformers as hf
from lowbit.families.registry import FAMILIES, Family
from lowbit.families.torch_folders import load, load_any, save, weights_bytes
from lowbit.runtimes.onnx_session import OnnxRuntimeModel, OnnxTensorModel

ModelLike = nn.Module | str | os.PathLike

LOG = logging.getLogger("lowbit")


def open_model(model: ModelLike, trust_code: bool = False,
               architecture: str | None = None) -> tuple[nn.Module, str | None]:
    """(the module, the path or spec it came from)."""
    if isinstance(model, nn.Module):
        return model.eval(), None
    return load_any(model, trust_code=trust_code, architecture=architecture), str(model)


def factory_spec(model: Any) -> str | None:
    """`model` when it is a `package.module:factory` the caller typed (not a path)."""
    text = str(model) if isinstance(model, (str, os.PathLike)) else ""
    return text if ":" in text and not Path(text).exists() else None


def find_tokenizer(*paths: str | None) -> Any:
    """The tokenizer saved beside the first of `paths` that has one."""
    for path in paths:
        if path and Path(path).is_dir():
            tokenizer = hf.load_tokenizer(path)
            if tokenizer is not None:
                return tokenizer
    return None


def model_tokenizer(model: nn.Module, *paths: str | None) -> Any:
    """The tokenizer beside `paths`, or beside the folder a transformers model came from."""
    source_folder = getattr(getattr(model, "config", None), "_name_or_path", None)
    return find_tokenizer(*paths, source_folder)


def _on_disk(model: nn.Module, path: str | None, scratch: Path, name: str,
             trust_code: bool) -> tuple[str | None, int | None, bool]:
    """A path the memory probe can load, the model's bytes on disk (saving it if needed), and
    whether the probe may import the factory it names: yes for a folder saved here from the
    caller's own model, as the caller said for a folder the caller named."""
    if path is not None:
        return path, weights_bytes(path), trust_code
    folder = scratch / name
    try:
        save(model, folder, runtime="eager")  # the model as the caller holds it
    except LowbitError:
        return None, None, False
    manifest = json.loads((folder / "lowbit.json").read_text())
    loadable = manifest["model"]["kind"] == "transformers" or manifest["model"].get("factory")
    return (str(folder) if loadable else None), weights_bytes(folder), True


def _probe_memory(path: str | None, sample: Any, scratch: Path, name: str,
                  trust_code: bool) -> dict[str, Any]:
    """Load time and peak RSS of a fresh Python process that loads `path` and runs one batch."""
    if path is None:
        return {"load_seconds": None, "peak_rss_bytes": None}
    inputs = scratch / f"{name}-inputs.safetensors"
    tensors = dict(sample) if isinstance(sample, dict) else {"input": sample}
    save_file({k: v.contiguous() for k, v in tensors.items()}, inputs)
    command = [sys.executable, "-m", "lowbit.families.memory_probe", path, str(inputs)]
    result = subprocess.run(command + (["--trust-code"] if trust_code else []),
                            capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        return {"load_seconds": None, "peak_rss_bytes": None,
                "probe_error": result.stderr.strip().splitlines()[-1:] or ["unknown"]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def _file_measure(paths: dict[str, str | None], scratch: Path, trust_code: bool, memory: bool) -> FileMeasure:
    """Size on disk, and (with `memory`) load time and peak RSS in a fresh process, per model."""
    def measure(name: str, model: nn.Module, first_input: Any) -> dict[str, Any]:
        loadable, size, trusted = _on_disk(model, paths[name], scratch, name, trust_code)
        probe = _probe_memory(loadable, first_input, scratch, name, trusted) if memory else {}
        return {"size_bytes": size, **probe}
    return measure


def compare(original: ModelLike, quantized: ModelLike, data: Any, settings: Settings, *,
            tokenizer: Any = None, memory: bool = True, progress: bool = True, trust_code: bool = False,
            **_: Any):
    """lowbit.compare for torch models: open both, find the tokenizer, measure them as `settings`
    says (lowbit.evaluate.compare_models.compare_models)."""
    original_model, original_path = open_model(original, trust_code)
    quantized_model, quantized_path = open_model(quantized, trust_code, factory_spec(original))
    tokenizer = tokenizer or model_tokenizer(original_model, quantized_path, original_path)
    twin = _eager_twin(quantized_model, quantized_path, original, trust_code)
    with tempfile.TemporaryDirectory(prefix="lowbit-compare-") as scratch:
        files = _file_measure({"original": original_path, "quantized": quantized_path}, Path(scratch),
                              trust_code, memory)
        return compare_models(original_model, quantized_model, data, settings, tokenizer, files, progress,
                              (original_path, quantized_path), layer_model=twin)


def _eager_twin(quantized: nn.Module, path: str | None, original: Any, trust_code: bool) -> nn.Module | None:
    """The same folder in PyTorch, when `quantized` runs in ONNX Runtime: the per-layer table is
    measured on its modules (the same integers), or left out when the folder cannot be rebuilt."""
    if not isinstance(quantized, OnnxRuntimeModel) or path is None:
        return None
    try:
        twin = load_any(path, trust_code=trust_code, architecture=factory_spec(original), runtime="torch")
    except LowbitError as error:
        LOG.info("per-layer error: %s runs in ONNX Runtime and cannot be rebuilt in PyTorch (%s)", path,
                 error)
        return None
    ops = (getattr(quantized, "lowbit_manifest", None) or {}).get("onnx", {}).get("ops", {})
    twin.lowbit_layer_ops = ops
    return twin


def bench(model: ModelLike, batch_sizes: Sequence[int] = (1, 8), seq_len: int = 128, runs: int = 20,
          threads: int | None = None, data: Any = None, memory: bool = True, trust_code: bool = False,
          **_: Any) -> dict[str, Any]:
    """lowbit.bench for torch models: open the model, find its tokenizer, time it."""
    loaded, path = open_model(model, trust_code)
    with tempfile.TemporaryDirectory(prefix="lowbit-bench-") as scratch:
        files = _file_measure({"model": path}, Path(scratch), trust_code, memory)
        settings = Settings(batch_sizes=batch_sizes, seq_len=seq_len, runs=runs, threads=threads)
        return bench_model(loaded, settings, data, find_tokenizer(path), files, path)


SMOKE_TOKENS = 32


def _open_original(model: ModelLike, trust_code: bool = False, **_: Any) -> nn.Module:
    return open_model(model, trust_code)[0]


def _smoke_input(model: nn.Module, path: Any) -> Any:
    """One batch to check a loaded model with: a sentence in token ids when a tokenizer is saved
    beside it, zeros of the graph's input shape for a plain model in ONNX Runtime, else None (a
    plain module records no input shape)."""
    tokenizer = find_tokenizer(str(path))
    if tokenizer is not None:
        return tokenize(tokenizer, [DEFAULT_TEXT], SMOKE_TOKENS)
    if isinstance(model, OnnxTensorModel):
        value = model.session.get_inputs()[0]
        return torch.zeros([size if isinstance(size, int) else 1 for size in value.shape])
    return None


def _smoke_run(model: nn.Module, batch: Any) -> bool:
    with torch.inference_mode():
        return is_finite(call_model(model, batch))


FAMILIES.add("torch", Family("torch", claims=lambda source: True, load=load, compare=compare, bench=bench,
                             open_original=_open_original, smoke_input=_smoke_input, smoke_run=_smoke_run,
                             fallback=True))
