"""`lowbit demo`: quantize the bundled real all-MiniLM-L6-v2 and measure what it costs and buys.

Everything shown is measured in this run: folder sizes on disk, latency at batch 1 (one short
sentence) and batch 8 (eight 128-token sequences), timed interleaved across the models, and mean
embedding cosine to fp32 on real Wikipedia sentences, embedded one at a time so the batch-1
kernels are the ones measured. Each quantized model is saved, reloaded, and the reloaded copy is
the one measured.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lowbit.data import assets
from lowbit.evaluate import LatencyStats, folder_bytes, mean_cosine, measure_latencies
from lowbit.families import transformers as hf
from lowbit.families.api import load, save
from lowbit.transform.quantize import quantize, quantized_modules

DEMO_RECIPES = ("w8a8-dynamic", "w4")


@dataclass
class DemoRow:
    """One model's measured figures."""

    name: str
    size_bytes: int
    cosine: float
    latency_batch1: LatencyStats | None = None
    latency_batch8: LatencyStats | None = None
    reload_identical: bool | None = None
    kernels: dict[str, int] = field(default_factory=dict)


def kernels_at_batch1(model: nn.Module) -> dict[str, int]:
    """How many modules run each kernel for a short sentence (the row bucket of ≤32 rows)."""
    counts: Counter[str] = Counter()
    for module in quantized_modules(model).values():
        counts[module.spec.kernel_for(32)] += 1
    return dict(counts)


def _measure_speed(models: dict[str, nn.Module], tokenizer, texts, rows, threads) -> None:
    short = hf.tokenize(tokenizer, texts[:1])
    long_batch = hf.tokenize(tokenizer, texts[:8], 128, pad_to_max=True)
    for inputs, runs, attribute in ((short, 30, "latency_batch1"), (long_batch, 5, "latency_batch8")):
        calls = {name: (lambda m=model, x=inputs: m(**x)) for name, model in models.items()}
        for name, stats in measure_latencies(calls, runs=runs, threads=threads).items():
            setattr(rows[name], attribute, stats)


def run_demo(
    recipes: tuple[str, ...] = DEMO_RECIPES,
    sentences: int = 256,
    threads: int | None = None,
    on_step: Callable[[str], None] = lambda message: None,
) -> list[DemoRow]:
    """Quantize MiniLM with each recipe, save and reload it, and measure it against fp32."""
    source = assets.minilm_path()
    texts = assets.wikipedia_sentences(sentences)
    on_step("loading all-MiniLM-L6-v2")
    model, tokenizer = hf.load_pretrained(source), hf.load_tokenizer(source)
    reference = hf.embed(model, tokenizer, texts)
    models = {"fp32": model}
    rows = {"fp32": DemoRow("fp32", folder_bytes(source / "model.safetensors"), 1.0)}
    with tempfile.TemporaryDirectory(prefix="lowbit-demo-") as scratch:
        for recipe in recipes:
            on_step(f"quantizing with {recipe}, saving and reloading")
            quantized = quantize(model, recipe, progress=False)
            folder = save(quantized, Path(scratch) / recipe, runtime="torch")  # reloads to the same numbers
            reloaded = models[recipe] = load(folder)
            on_step(f"embedding {len(texts)} sentences with {recipe}")
            embeddings = hf.embed(reloaded, tokenizer, texts)
            with torch.inference_mode():
                identical = torch.equal(hf.embed(quantized, tokenizer, texts[:16]), embeddings[:16])
            rows[recipe] = DemoRow(recipe, folder_bytes(folder), mean_cosine(reference, embeddings),
                                   reload_identical=identical, kernels=kernels_at_batch1(reloaded))
    on_step("timing every model, interleaved")
    _measure_speed(models, tokenizer, texts, rows, threads)
    return list(rows.values())
