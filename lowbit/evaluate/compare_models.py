"""Measure an original and a quantized module side by side on the same data.

Quality (with a bootstrap interval on each change), latency at each batch size (interleaved),
throughput, bytes in memory, per-layer SQNR with the kernel each layer ran, and (through the
`files` callback a family passes) size on disk, load time and peak RSS. Returns a `Comparison`.
Opening models from paths is the families' work (lowbit.families.api).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowbit.data.batches import as_dataset, inputs_per_batch_size, speed_inputs, task_batches, tokenize
from lowbit.errors import LowbitError
from lowbit.evaluate.comparison import Comparison
from lowbit.evaluate.latency import compare_latency, generation_speed, under_machine_load
from lowbit.evaluate.layers import layer_errors
from lowbit.evaluate.size import parameter_bytes
from lowbit.evaluate.tasks import METRICS_BY_KIND, Task, collect_outputs, is_transformers_model, score_quality
from lowbit.progress import progress_bar
from lowbit.transform.quantize import quantized_modules

# (name, model, a first input) -> size_bytes, load_seconds, peak_rss_bytes (what a family measures on disk)
FileMeasure = Callable[[str, nn.Module, Any], dict[str, Any]]


def infer_kind(model: nn.Module, metric: str | None) -> str:
    """The task kind for a model: causal_lm, logits (classifiers), embedding (encoders), tensor."""
    name = type(model).__name__
    if name.endswith("ForCausalLM"):
        kind = "causal_lm"
    elif is_transformers_model(model) and "For" in name:
        kind = "logits"
    elif is_transformers_model(model):
        kind = "embedding"
    else:
        kind = "logits" if metric in (None, "accuracy", "f1", "agreement") else "tensor"
    if metric and metric not in METRICS_BY_KIND[kind]:
        fits = [k for k, names in METRICS_BY_KIND.items() if metric in names]
        if not is_transformers_model(model) and fits:
            return fits[0]
        raise LowbitError(f"metric {metric!r} does not apply to {name}; "
                          f"use one of {', '.join(METRICS_BY_KIND[kind])}")
    return kind


@dataclass(frozen=True)
class Settings:
    """What `compare_models` measures: the headline `metric` (default: the first for the model
    kind: cosine for encoders, accuracy or agreement for classifiers, perplexity for causal LMs;
    every metric of the kind is measured anyway), the batch sizes timed, the quality budget
    (`max_drop`, absolute or with `relative` a fraction of the original's value), how many
    samples and tokens per sample, timed runs and threads."""

    metric: str | None = None
    batch_sizes: Sequence[int] = (1, 8)
    max_drop: float | None = None
    relative: bool = False
    samples: int | None = 256
    seq_len: int = 128
    runs: int = 20
    threads: int | None = None


def compare_models(original: nn.Module, quantized: nn.Module, data: Any, settings: Settings = Settings(),
                   tokenizer: Any = None, files: FileMeasure | None = None, progress: bool = True,
                   sources: tuple[str | None, str | None] = (None, None),
                   layer_model: nn.Module | None = None) -> Comparison:
    """Measure `quantized` against `original` on `data` (a file, texts, or a tensor), as
    `settings` says. Text data needs `tokenizer`; `files` measures each model on disk;
    `sources` are the paths the models came from. `layer_model` is the quantized model in PyTorch
    when `quantized` runs elsewhere (ONNX Runtime): the per-layer table is measured on its modules,
    each row naming the op that runs the layer there (`lowbit_layer_ops`)."""
    original_model, quantized_model = original.eval(), quantized.eval()
    metric, batch_sizes, seq_len = settings.metric, settings.batch_sizes, settings.seq_len
    runs, threads = settings.runs, settings.threads
    kind = infer_kind(original_model, metric)
    dataset = as_dataset(data)
    available = len(dataset)
    if settings.samples:
        dataset = dataset.head(settings.samples)
    task = Task(kind, labels=dataset.labels if kind == "logits" else None)
    metric = metric or task.metrics()[0]
    # Quality at the smallest batch size: kernels are chosen per row count, and small batches run
    # the integer kernels (larger ones may run dequantized float GEMMs, which are more accurate).
    quality_batch_size = min(batch_sizes)
    batches = task_batches(dataset, kind, tokenizer, quality_batch_size, seq_len)
    with progress_bar(progress) as bar:
        step = bar.add_task("quality", total=5)
        outputs = {name: collect_outputs(model, batches, task)
                   for name, model in (("original", original_model), ("quantized", quantized_model))}
        quality = score_quality(task, outputs["original"], outputs["quantized"])
        bar.update(step, advance=1, description="per-layer error")
        layered = quantized_model if layer_model is None else layer_model.eval()
        layers = layer_errors(original_model, layered, batches[:8], quantized_modules(layered))
        for row in layers:
            op = getattr(layered, "lowbit_layer_ops", {}).get(row["name"])
            row["kernel"] = f"ONNX Runtime {op}" if op else row["kernel"]
        bar.update(step, advance=1, description="latency")
        timed = speed_inputs(dataset, kind, tokenizer, batch_sizes, seq_len)
        latency, load = under_machine_load(lambda: compare_latency(
            {"original": original_model, "quantized": quantized_model}, timed, runs=runs, threads=threads))
        reports = {}
        for (name, model), path in zip((("original", original_model), ("quantized", quantized_model)),
                                       sources, strict=True):
            bar.update(step, advance=0.5, description=f"size and memory of the {name} model")
            probe = files(name, model, next(iter(timed.values()))) if files else {}
            reports[name] = {
                "source": path,
                "size_bytes": probe.get("size_bytes"),
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
            prompt = timed[str(batch_sizes[0])]["input_ids"][:1]
            for name, model in (("original", original_model), ("quantized", quantized_model)):
                reports[name]["generation"] = generation_speed(model, prompt, threads=threads)
    recorded = {"kind": kind, "samples": len(dataset), "available_samples": available, **load,
                "batch_sizes": list(batch_sizes),
                "quality_batch_size": quality_batch_size,
                "seq_len": seq_len, "runs": runs,
                "layers_in_pytorch": layer_model is not None,
                "threads": threads or torch.get_num_threads(), "torch": torch.__version__}
    return Comparison(reports["original"], reports["quantized"], quality, metric, layers, recorded,
                      settings.max_drop, settings.relative)


DEFAULT_TEXT = ("Quantization stores the weights of a trained network in fewer bits, so the model "
                "takes less memory and, with the right kernels, runs faster on the same hardware. ")


def bench_model(model: nn.Module, settings: Settings, data: Any = None, tokenizer: Any = None,
                files: FileMeasure | None = None, source: str | None = None) -> dict[str, Any]:
    """Latency, throughput, size, memory and load time of one module, at `settings`' batch sizes,
    runs and threads. Text models get `settings.seq_len`-token inputs made from `data` (or a fixed
    English paragraph); tensor models need `data`. `files` measures the model on disk."""
    batch_sizes, seq_len = settings.batch_sizes, settings.seq_len
    loaded = model.eval()
    kind = infer_kind(loaded, None)
    if data is None:
        if tokenizer is None:
            raise LowbitError("this model takes tensors: pass data (e.g. --data inputs.safetensors)")
        data = [DEFAULT_TEXT * (seq_len // 20 + 1)] * max(batch_sizes)
    inputs = inputs_per_batch_size(as_dataset(data), batch_sizes,
                                   lambda texts, size: tokenize(tokenizer, texts, seq_len, pad_to_max=True))
    latency = compare_latency({"model": loaded}, inputs, runs=settings.runs,
                              threads=settings.threads)["model"]
    report: dict[str, Any] = {"source": source, "kind": kind, "param_bytes": parameter_bytes(loaded),
                              "latency_ms": latency, "seq_len": seq_len,
                              "threads": settings.threads or torch.get_num_threads()}
    report.update(files("model", loaded, next(iter(inputs.values()))) if files else {"size_bytes": None})
    if kind == "causal_lm":
        report["generation"] = generation_speed(loaded, next(iter(inputs.values()))["input_ids"][:1],
                                                threads=settings.threads)
    return report
