"""Quantization-aware training with distillation (lowbit.qat) against post-training quantization
of the same recipe, on real models and held-out data.

all-MiniLM-L6-v2, recipe w4 (int4, groups of 128, embedding table too): the float model teaches
its fake-quantized copy on 2,000 Wikipedia first sentences (documents 256-2,255 of the
topic-interleaved corpus, no labels) for --budget seconds. Judged by the cosine of mean-pooled
embeddings to fp32 on two held-out sets: the 256 sentences bench.minilm scores (documents 0-255)
and 256 others (documents 5,000-5,255). "recovered" is the share of the post-training loss
(1 − cosine) that training wins back. Writes bench/results/qat.json.

    .venv/bin/python -m bench.qat [--budget 600] [--threads 2]
"""

from __future__ import annotations

import time

import lowbit
from bench.common import bench_arguments, print_table, write_json
from lowbit.data import assets
from lowbit.evaluate import mean_cosine
from lowbit.families import transformers as hf

TRAIN = (2000, 256)  # (count, offset) of the training sentences
HELD_OUT = {"cosine": (256, 0), "cosine, re-check": (256, 5000)}


def recovered(ptq: float, trained: float) -> float:
    """Share of the post-training loss (1 − cosine) won back by training."""
    return (trained - ptq) / (1.0 - ptq) if ptq < 1.0 else float("nan")


def minilm_rows(recipe: str, budget: int) -> list[dict]:
    from transformers import AutoModel

    path = assets.minilm_path()
    tokenizer = hf.load_tokenizer(path)
    fp32 = AutoModel.from_pretrained(str(path), attn_implementation="eager").eval()
    held_out = {name: assets.wikipedia_sentences(*place) for name, place in HELD_OUT.items()}
    references = {name: hf.embed(fp32, tokenizer, texts) for name, texts in held_out.items()}

    def scores(model) -> dict[str, float]:
        return {name: mean_cosine(references[name], hf.embed(model, tokenizer, texts))
                for name, texts in held_out.items()}

    ptq = scores(lowbit.quantize(fp32, recipe, progress=False))
    start = time.perf_counter()
    prepared = lowbit.qat.prepare(fp32, recipe)
    result = lowbit.qat.distill(prepared, fp32, assets.wikipedia_sentences(*TRAIN), tokenizer=tokenizer,
                                time_budget=budget)
    trained = scores(lowbit.qat.convert(prepared))
    minutes = (time.perf_counter() - start) / 60
    rows = [{"model": "MiniLM", "recipe": recipe, "method": "post-training (RTN)", **ptq},
            {"model": "MiniLM", "recipe": recipe, "method": "QAT + distillation", **trained,
             "recovered": recovered(ptq["cosine"], trained["cosine"]),
             "recovered, re-check": recovered(ptq["cosine, re-check"], trained["cosine, re-check"]),
             "steps": result.steps, "minutes": minutes, "curve": result.curve}]
    return rows


def main() -> None:
    args = bench_arguments(__doc__, runs=None, extra={"--budget": 600})
    rows = minilm_rows("w4", args.budget)
    print_table(f"QAT + distillation vs post-training, {args.threads} threads, measured now", rows,
                [("model", "model"), ("recipe", "recipe"), ("method", "method"), ("cosine", "cosine"),
                 ("recovered", "recovered"), ("cosine, re-check", "cosine (re-check)"),
                 ("recovered, re-check", "recovered (re-check)"), ("steps", "steps"),
                 ("minutes", "minutes")])
    print(f"results: {write_json('qat', {'threads': args.threads, 'budget_s': args.budget, 'rows': rows})}")


if __name__ == "__main__":
    main()
