"""SmolLM2-135M decode, eager against torch.compile: how much of a decode step is Python overhead.

Four contenders, timed interleaved at batch 1 (64-token prompt, 32 new tokens): fp32 and lowbit
w8, each eager and under `torch.compile(model, dynamic=True)` (inductor, CPU). The first decode of
a compiled model compiles it; its seconds are reported apart ("compile s"), and depend on
whether inductor's on-disk cache (/tmp/torchinductor_$USER) already holds the graphs.
Writes bench/results/smollm2_compile.json.

    .venv/bin/python -m bench.smollm2_compile --runs 3     # about 15 minutes on 2 cores, cold
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

import lowbit
from bench.common import bench_arguments, print_table, write_json
from bench.smollm2 import NEW_TOKENS, PROMPT_TOKENS, decode_speed, torch_contender
from lowbit.data import assets
from lowbit.data.batches import language_model_windows
from lowbit.evaluate import folder_bytes
from lowbit.families import transformers as hf


def inductor_cache_state() -> str:
    cache = Path(tempfile.gettempdir()) / f"torchinductor_{Path.home().name}"
    return "warm" if cache.exists() and any(cache.iterdir()) else "cold"


def main() -> None:
    args = bench_arguments(__doc__, runs=3)
    from transformers import AutoModelForCausalLM

    path = hf.smollm2_path()
    tokenizer = hf.load_tokenizer(path)
    texts = [document["extract"] for document in assets.wikipedia_documents()[:50]]
    prompt = language_model_windows(tokenizer, texts, 512)[0]["input_ids"][:, :PROMPT_TOKENS]
    cache = inductor_cache_state()
    fp32 = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    w8 = lowbit.quantize(fp32, "w8", progress=False)
    size = folder_bytes(path / "model.safetensors")
    contenders, compile_seconds = {}, {}
    with torch.inference_mode():
        for name, model in (("fp32", fp32), ("lowbit w8", w8)):
            contenders[f"{name} eager"] = torch_contender(model, size)
            compiled = torch_contender(torch.compile(model, dynamic=True), size)
            start = time.perf_counter()
            compiled.decode(prompt, 4)  # compiles the prefill and the decode graphs
            compile_seconds[f"{name} compiled"] = time.perf_counter() - start
            contenders[f"{name} compiled"] = compiled
        speeds = decode_speed(contenders, prompt, args.runs)
    baseline = speeds["fp32 eager"]["decode_tokens_per_second"]
    rows = [{"model": name, **speeds[name], "ms_per_token": 1000 / speeds[name]["decode_tokens_per_second"],
             "decode_vs_fp32_eager": speeds[name]["decode_tokens_per_second"] / baseline,
             "compile_seconds": compile_seconds.get(name)} for name in contenders]
    print_table(f"SmolLM2-135M decode at batch 1, {args.threads} threads, {NEW_TOKENS} new tokens, median of "
                f"{args.runs} interleaved rounds; inductor cache {cache} at start (measured now)",
                rows, [("model", "model"), ("prefill_tokens_per_second", "prefill tok/s"),
                       ("decode_tokens_per_second", "decode tok/s"), ("ms_per_token", "ms/token"),
                       ("decode_vs_fp32_eager", "× fp32 eager"), ("compile_seconds", "compile s")])
    results = write_json("smollm2_compile", {"threads": args.threads, "inductor_cache": cache, "rows": rows})
    print(f"results: {results}")


if __name__ == "__main__":
    main()
