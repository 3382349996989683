"""`lowbit demo`: quantize the bundled real all-MiniLM-L6-v2 and measure what it costs and buys.

Everything shown is measured in this run: folder sizes on disk, latency at batch 1 (one short
sentence) and batch 8 (eight 128-token sequences), and mean embedding cosine to fp32 on real
Wikipedia sentences, embedded one at a time so the batch-1 kernels are the ones measured.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lowbit import assets, hf
from lowbit.evaluate import LatencyStats, folder_bytes, mean_cosine, measure_latency
from lowbit.persist import load, save
from lowbit.quantize import quantize, quantized_modules

DEMO_RECIPES = ("w8a8-dynamic", "w4")


@dataclass
class DemoRow:
    """One model's measured figures."""

    name: str
    size_bytes: int
    latency_batch1: LatencyStats
    latency_batch8: LatencyStats
    cosine: float
    reload_identical: bool | None = None
    kernels: dict[str, int] = field(default_factory=dict)


def _kernels_at_batch1(model: nn.Module) -> dict[str, int]:
    """How many modules run each kernel for a short sentence (the row bucket of ≤32 rows)."""
    counts: Counter[str] = Counter()
    for module in quantized_modules(model).values():
        kernels = module.spec.kernels
        counts[kernels.get("32", kernels.get("all", "reference"))] += 1
    return dict(counts)


def _measure(name, model, tokenizer, size_bytes, sentences, reference, threads) -> DemoRow:
    short = hf.tokenize(tokenizer, sentences[:1])
    long_batch = dict(tokenizer(sentences[:8], padding="max_length", truncation=True,
                                max_length=128, return_tensors="pt"))
    embeddings = hf.embed(model, tokenizer, sentences, batch_size=1)
    return DemoRow(
        name=name,
        size_bytes=size_bytes,
        latency_batch1=measure_latency(lambda: model(**short), runs=30, threads=threads),
        latency_batch8=measure_latency(lambda: model(**long_batch), runs=5, threads=threads),
        cosine=1.0 if reference is None else mean_cosine(reference, embeddings),
        kernels=_kernels_at_batch1(model),
    ), embeddings


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
    on_step("measuring fp32")
    fp32_row, reference = _measure("fp32", model, tokenizer, folder_bytes(source / "model.safetensors"),
                                   texts, None, threads)
    rows = [fp32_row]
    with tempfile.TemporaryDirectory(prefix="lowbit-demo-") as scratch:
        for recipe in recipes:
            on_step(f"quantizing with {recipe}")
            quantized = quantize(model, recipe, progress=False)
            folder = save(quantized, Path(scratch) / recipe)
            reloaded = load(folder)
            on_step(f"measuring {recipe}")
            row, embeddings = _measure(recipe, reloaded, tokenizer, folder_bytes(folder), texts,
                                       reference, threads)
            with torch.inference_mode():
                row.reload_identical = torch.equal(hf.embed(quantized, tokenizer, texts[:16]),
                                                   embeddings[:16])
            rows.append(row)
    return rows
