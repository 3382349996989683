"""Where a SmolLM2-135M decode step spends its time: torch.profiler over lowbit w8 decode.

Decodes `--tokens` tokens after a 64-token prompt at batch 1, eager, and prints the wall time per
token, then the profiler's busiest aten ops per token. The gap between the wall time and the sum
of op times is Python dispatch between the ops. Writes bench/results/smollm2_profile.json.

    .venv/bin/python -m bench.smollm2_profile --tokens 16     # about 2 minutes on 2 cores
"""

from __future__ import annotations

import time

import torch
from torch.profiler import ProfilerActivity, profile

import lowbit
from bench.common import bench_arguments, print_table, write_json
from bench.smollm2 import PROMPT_TOKENS
from lowbit.data import assets
from lowbit.data.batches import language_model_windows
from lowbit.families import transformers as hf


def decode_steps(model: torch.nn.Module, output, tokens: int) -> float:
    """Seconds per token of `tokens` greedy decode steps after `output` (a prefill's output)."""
    start = time.perf_counter()
    for _ in range(tokens):
        token = output.logits[:, -1:].argmax(-1)
        output = model(input_ids=token, past_key_values=output.past_key_values, use_cache=True)
    return (time.perf_counter() - start) / tokens


def main() -> None:
    args = bench_arguments(__doc__, runs=1, extra={"--tokens": 16})
    from transformers import AutoModelForCausalLM

    path = hf.smollm2_path()
    texts = [document["extract"] for document in assets.wikipedia_documents()[:50]]
    prompt = language_model_windows(hf.load_tokenizer(path), texts, 512)[0]["input_ids"][:, :PROMPT_TOKENS]
    fp32 = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    w8 = lowbit.quantize(fp32, "w8", progress=False)
    with torch.inference_mode():
        decode_steps(w8, w8(input_ids=prompt, use_cache=True), 4)  # warm-up: kernel choice, packing
        wall = decode_steps(w8, w8(input_ids=prompt, use_cache=True), args.tokens)
        prefilled = w8(input_ids=prompt, use_cache=True)
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            decode_steps(w8, prefilled, args.tokens)
    events = sorted(profiler.key_averages(), key=lambda event: event.self_cpu_time_total, reverse=True)
    ops_ms = sum(event.self_cpu_time_total for event in events) / 1000 / args.tokens
    rows = [{"op": event.key, "ms_per_token": event.self_cpu_time_total / 1000 / args.tokens,
             "calls_per_token": event.count / args.tokens} for event in events[:12]]
    print_table(f"lowbit w8 SmolLM2-135M decode, {args.threads} threads: {wall * 1000:.1f} ms per token "
                f"(wall, unprofiled), of which aten ops {ops_ms:.1f} ms (profiled)", rows,
                [("op", "op"), ("ms_per_token", "ms/token"), ("calls_per_token", "calls/token")])
    print(f"results: {write_json('smollm2_profile', {'wall_ms_per_token': wall * 1000, 'rows': rows})}")


if __name__ == "__main__":
    main()
