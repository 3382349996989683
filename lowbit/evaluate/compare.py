"""`lowbit.compare`: measure an original and a quantized model side by side on the same data.

Quality (with a bootstrap interval on each change), latency at each batch size (interleaved),
throughput, size on disk, bytes in memory, load time and peak RSS of a fresh process per model,
and per-layer SQNR with the kernel each layer ran. Returns a `Comparison`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from rich.progress import Progress
from safetensors.torch import save_file
from torch import nn

from lowbit.data.datasets import Dataset, language_model_windows, read_dataset, tensor_batches, text_batches
from lowbit.errors import LowbitError
from lowbit.evaluate.benchmark import parameter_bytes
from lowbit.evaluate.comparison import Comparison
from lowbit.evaluate.layers import layer_errors
from lowbit.evaluate.speed import compare_latency, generation_speed
from lowbit.evaluate.tasks import METRICS_BY_KIND, Task, collect_outputs, score_quality
from lowbit.families import transformers as hf
from lowbit.families.loading import load_any, weights_bytes
from lowbit.formats.persist import save
from lowbit.transform.quantize import quantized_modules

ModelLike = nn.Module | str | os.PathLike


def infer_kind(model: nn.Module, metric: str | None) -> str:
    """The task kind for a model: causal_lm, logits (classifiers), embedding (encoders), tensor."""
    name = type(model).__name__
    if name.endswith("ForCausalLM"):
        kind = "causal_lm"
    elif hf.is_transformers_model(model) and "For" in name:
        kind = "logits"
    elif hf.is_transformers_model(model):
        kind = "embedding"
    else:
        kind = "logits" if metric in (None, "accuracy", "f1", "agreement") else "tensor"
    if metric and metric not in METRICS_BY_KIND[kind]:
        fits = [k for k, names in METRICS_BY_KIND.items() if metric in names]
        if not hf.is_transformers_model(model) and fits:
            return fits[0]
        raise LowbitError(f"metric {metric!r} does not apply to {name}; "
                          f"use one of {', '.join(METRICS_BY_KIND[kind])}")
    return kind


def open_model(model: ModelLike, trust_code: bool = False,
               architecture: str | None = None) -> tuple[nn.Module, str | None]:
    if isinstance(model, nn.Module):
        return model.eval(), None
    return load_any(model, trust_code=trust_code, architecture=architecture), str(model)


def _factory_spec(model: ModelLike) -> str | None:
    """`model` when it is a `package.module:factory` the caller typed (not a path)."""
    text = str(model) if isinstance(model, (str, os.PathLike)) else ""
    return text if ":" in text and not Path(text).exists() else None


def find_tokenizer(*paths: str | None) -> Any:
    for path in paths:
        if path and Path(path).is_dir():
            tokenizer = hf.load_tokenizer(path)
            if tokenizer is not None:
                return tokenizer
    return None


def as_dataset(data: Any) -> Dataset:
    if isinstance(data, Dataset):
        return data
    if isinstance(data, (str, os.PathLike)):
        return read_dataset(data)
    if isinstance(data, torch.Tensor):
        return Dataset(inputs=data)
    if isinstance(data, Sequence) and data and all(isinstance(t, str) for t in data):
        return Dataset(texts=list(data))
    raise LowbitError("data must be a file path, a list of texts, a tensor, or a lowbit Dataset")


def task_batches(dataset: Dataset, kind: str, tokenizer: Any, batch_size: int, seq_len: int) -> list[Any]:
    if dataset.texts is None:
        return tensor_batches(dataset.inputs, batch_size)
    if tokenizer is None:
        raise LowbitError("text data needs a tokenizer: compare transformers folders, or pass tokenizer=")
    if kind == "causal_lm":
        return language_model_windows(tokenizer, dataset.texts, seq_len)
    return text_batches(tokenizer, dataset.texts, batch_size, seq_len)


def _inputs_per_batch_size(dataset: Dataset, batch_sizes: Iterable[int],
                           text_batch: Callable[[list[str], int], Any]) -> dict[str, Any]:
    """One model input per batch size, from the first samples (`text_batch` turns texts into one)."""
    inputs = {}
    for size in batch_sizes:
        head = dataset.head(size)
        if len(head) < size:
            raise LowbitError(f"batch size {size} needs at least {size} samples; the data has {len(head)}")
        inputs[str(size)] = head.inputs if head.texts is None else text_batch(head.texts, size)
    return inputs


def _speed_inputs(dataset: Dataset, kind: str, tokenizer: Any, batch_sizes: Iterable[int],
                  seq_len: int) -> dict[str, Any]:
    if kind == "causal_lm" and dataset.texts is not None:
        window = language_model_windows(tokenizer, dataset.texts, seq_len)[0]
        return _inputs_per_batch_size(dataset, batch_sizes, lambda texts, size: {
            k: v.repeat(size, 1) for k, v in window.items() if k != "labels"})
    return _inputs_per_batch_size(dataset, batch_sizes,
                                  lambda texts, size: text_batches(tokenizer, texts, size, seq_len)[0])


def _on_disk(model: nn.Module, path: str | None, scratch: Path, name: str,
             trust_code: bool) -> tuple[str | None, int | None, bool]:
    """A path the memory probe can load, the model's bytes on disk (saving it if needed), and
    whether the probe may import the factory it names: yes for a folder saved here from the
    caller's own model, as the caller said for a folder the caller named."""
    if path is not None:
        return path, weights_bytes(path), trust_code
    folder = scratch / name
    try:
        save(model, folder)
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
    command = [sys.executable, "-m", "lowbit.evaluate.memory_probe", path, str(inputs)]
    result = subprocess.run(command + (["--trust-code"] if trust_code else []),
                            capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        return {"load_seconds": None, "peak_rss_bytes": None,
                "probe_error": result.stderr.strip().splitlines()[-1:] or ["unknown"]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def compare(
    original: ModelLike,
    quantized: ModelLike,
    data: Any,
    metric: str | None = None,
    batch_sizes: Sequence[int] = (1, 8),
    max_drop: float | None = None,
    relative: bool = False,
    samples: int | None = 256,
    seq_len: int = 128,
    runs: int = 20,
    threads: int | None = None,
    tokenizer: Any = None,
    memory: bool = True,
    progress: bool = True,
    trust_pickle: bool = False,
    trust_code: bool = False,
) -> Comparison:
    """Measure `quantized` against `original` on `data` (a file, texts, or a tensor).

    `metric` picks the headline quality metric (default: the first for the model kind:
    cosine for encoders, accuracy or agreement for classifiers, perplexity for causal LMs);
    every metric of the kind is measured anyway. `max_drop` is the quality budget (absolute,
    or a fraction of the original's value with `relative=True`). scikit-learn estimators and
    model files are measured by lowbit.families.sklearn.compare (agreement, accuracy or R², predict speed);
    `trust_pickle` allows reading a .joblib/.pkl original; `trust_code` lets a lowbit folder's
    manifest name a `module:factory` to import (see lowbit.load).
    """
    from lowbit.families.sklearn.compare import compare_estimators, is_sklearn_model

    if is_sklearn_model(original) or is_sklearn_model(quantized):
        return compare_estimators(original, quantized, data, metric=metric, batch_sizes=batch_sizes,
                                  max_drop=max_drop, relative=relative, samples=samples, runs=runs,
                                  threads=threads, trust_pickle=trust_pickle)
    original_model, original_path = open_model(original, trust_code)
    quantized_model, quantized_path = open_model(quantized, trust_code, _factory_spec(original))
    kind = infer_kind(original_model, metric)
    dataset = as_dataset(data)
    if samples:
        dataset = dataset.head(samples)
    source_folder = getattr(getattr(original_model, "config", None), "_name_or_path", None)
    tokenizer = tokenizer or find_tokenizer(quantized_path, original_path, source_folder)
    task = Task(kind, labels=dataset.labels if kind == "logits" else None)
    metric = metric or task.metrics()[0]
    # Quality at the smallest batch size: kernels are chosen per row count, and small batches run
    # the integer kernels (larger ones may run dequantized float GEMMs, which are more accurate).
    quality_batch_size = min(batch_sizes)
    batches = task_batches(dataset, kind, tokenizer, quality_batch_size, seq_len)
    with Progress(transient=True, disable=not progress) as bar, \
            tempfile.TemporaryDirectory(prefix="lowbit-compare-") as scratch_dir:
        scratch = Path(scratch_dir)
        step = bar.add_task("quality", total=5)
        outputs = {name: collect_outputs(model, batches, task)
                   for name, model in (("original", original_model), ("quantized", quantized_model))}
        quality = score_quality(task, outputs["original"], outputs["quantized"])
        bar.update(step, advance=1, description="per-layer error")
        layers = layer_errors(original_model, quantized_model, batches[:8],
                              quantized_modules(quantized_model))
        bar.update(step, advance=1, description="latency")
        speed_inputs = _speed_inputs(dataset, kind, tokenizer, batch_sizes, seq_len)
        latency = compare_latency({"original": original_model, "quantized": quantized_model},
                                  speed_inputs, runs=runs, threads=threads)
        reports = {}
        for name, model, path in (("original", original_model, original_path),
                                  ("quantized", quantized_model, quantized_path)):
            bar.update(step, advance=0.5, description=f"size and memory of the {name} model")
            loadable, size, trusted = _on_disk(model, path, scratch, name, trust_code)
            first_batch = next(iter(speed_inputs.values()))
            probe = _probe_memory(loadable, first_batch, scratch, name, trusted) if memory else {}
            reports[name] = {
                "source": path,
                "size_bytes": size,
                "param_bytes": parameter_bytes(model),
                "peak_rss_bytes": probe.get("peak_rss_bytes"),
                "load_seconds": probe.get("load_seconds"),
                "latency_ms": {b: {k: v for k, v in e.items() if k != "throughput"}
                               for b, e in latency[name].items()},
                "throughput": {b: e["throughput"] for b, e in latency[name].items()},
                "quality": {m: entry[name] for m, entry in quality.items()},
            }
        if kind == "causal_lm":
            bar.update(step, advance=0, description="generation speed")
            prompt = speed_inputs[str(batch_sizes[0])]["input_ids"][:1]
            for name, model in (("original", original_model), ("quantized", quantized_model)):
                reports[name]["generation"] = generation_speed(model, prompt, threads=threads)
    settings = {"kind": kind, "samples": len(dataset), "batch_sizes": list(batch_sizes),
                "quality_batch_size": quality_batch_size,
                "seq_len": seq_len, "runs": runs,
                "threads": threads or torch.get_num_threads(), "torch": torch.__version__}
    return Comparison(reports["original"], reports["quantized"], quality, metric, layers, settings,
                      max_drop, relative)


DEFAULT_TEXT = ("Quantization stores the weights of a trained network in fewer bits, so the model "
                "takes less memory and, with the right kernels, runs faster on the same hardware. ")


def bench(
    model: ModelLike,
    batch_sizes: Sequence[int] = (1, 8),
    seq_len: int = 128,
    runs: int = 20,
    threads: int | None = None,
    data: Any = None,
    memory: bool = True,
    trust_pickle: bool = False,
    trust_code: bool = False,
) -> dict[str, Any]:
    """Latency, throughput, size, memory and load time of one model.

    Text models get `seq_len`-token inputs made from `data` (or a fixed English paragraph);
    tensor models need `data`. A scikit-learn estimator or file is timed on `data` by
    lowbit.families.sklearn.compare.bench_estimator (`trust_pickle` allows a .joblib/.pkl file).
    """
    from lowbit.families.sklearn.compare import bench_estimator, is_sklearn_model

    if is_sklearn_model(model):
        return bench_estimator(model, data, batch_sizes, runs, threads, trust_pickle)
    loaded, path = open_model(model, trust_code)
    kind = infer_kind(loaded, None)
    tokenizer = find_tokenizer(path)
    if data is None:
        if tokenizer is None:
            raise LowbitError("this model takes tensors: pass data (e.g. --data inputs.safetensors)")
        data = [DEFAULT_TEXT * (seq_len // 20 + 1)] * max(batch_sizes)
    inputs = _inputs_per_batch_size(as_dataset(data), batch_sizes, lambda texts, size: dict(
        tokenizer(texts, padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt")))
    latency = compare_latency({"model": loaded}, inputs, runs=runs, threads=threads)["model"]
    report: dict[str, Any] = {"source": path, "kind": kind, "param_bytes": parameter_bytes(loaded),
                              "latency_ms": latency, "seq_len": seq_len,
                              "threads": threads or torch.get_num_threads()}
    with tempfile.TemporaryDirectory(prefix="lowbit-bench-") as scratch_dir:
        scratch = Path(scratch_dir)
        loadable, report["size_bytes"], trusted = _on_disk(loaded, path, scratch, "model", trust_code)
        if memory:
            report.update(_probe_memory(loadable, next(iter(inputs.values())), scratch, "model", trusted))
    if kind == "causal_lm":
        report["generation"] = generation_speed(loaded, next(iter(inputs.values()))["input_ids"][:1],
                                                threads=threads)
    return report
