"""SmoothQuant on SmolLM2-135M: W8A8 (dynamic) perplexity with and without smoothing.

Perplexity over the first 2,048 tokens of Wikipedia extracts (4 windows of 512); calibration on
4 × 256 tokens of other extracts (the last 40 documents). Rows: fp32, w8a8-dynamic, and
w8a8-dynamic with `smoothing` α = 0.3, 0.5 and 0.8 (lowbit.transform.smooth), each as a relative
change from fp32. Writes bench/results/smoothquant.json.

    .venv/bin/python -m bench.smoothquant [--threads 2]
"""

from __future__ import annotations

import time

import torch

import lowbit
from bench.common import bench_arguments, print_table, write_json
from lowbit.data import assets
from lowbit.families import transformers as hf

ALPHAS = (None, 0.3, 0.5, 0.8)


def token_windows(tokenizer, documents, count: int, length: int) -> torch.Tensor:
    ids = tokenizer("\n\n".join(d["extract"] for d in documents), return_tensors="pt")["input_ids"]
    return ids[:, : count * length].reshape(count, length)


def perplexity(model, windows: torch.Tensor) -> float:
    with torch.inference_mode():
        losses = [model(input_ids=window[None], labels=window[None]).loss for window in windows]
    return float(torch.exp(torch.stack(losses).mean()))


def main() -> None:
    from transformers import AutoModelForCausalLM

    args = bench_arguments(__doc__, runs=None)
    path = hf.smollm2_path()
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    tokenizer = hf.load_tokenizer(path)
    documents = assets.wikipedia_documents()
    evaluation = token_windows(tokenizer, documents[:60], 4, 512)
    windows = token_windows(tokenizer, documents[-40:], 4, 256)
    calibration = [{"input_ids": window[None]} for window in windows]
    base = perplexity(model, evaluation)
    rows = [{"model": "fp32", "perplexity": base, "change": 0.0}]
    for alpha in ALPHAS:
        started = time.perf_counter()
        recipe = lowbit.make_recipe("w8a8-dynamic", smoothing=alpha)
        quantized = lowbit.quantize(model, recipe, calibration=calibration, progress=False)
        seconds = time.perf_counter() - started
        value = perplexity(quantized, evaluation)
        rows.append({"model": f"w8a8-dynamic{'' if alpha is None else f', smoothing {alpha}'}",
                     "perplexity": value, "change": value / base - 1, "quantize_s": seconds})
    print_table(f"SmolLM2-135M, 2,048 Wikipedia tokens (context 512), {args.threads} threads", rows,
                [("model", "model"), ("perplexity", "perplexity"), ("change", "vs fp32"),
                 ("quantize_s", "quantize s")])
    print(f"results: {write_json('smoothquant', {'threads': args.threads, 'rows': rows})}")


if __name__ == "__main__":
    main()
