"""Pruning + int8 with distillation (lowbit.prune, lowbit.distill) on all-MiniLM-L6-v2: quality
and file size against plain w8, on held-out data.

Half of the weights of the Linears and embedding tables are pruned (unstructured: by row; 2:4: two
of every four inputs) by SparseGPT on the first --calibration training sentences (each Linear's
kept weights updated to make up for the pruned ones; the embedding tables by magnitude), then
quantized w8 (int8 per channel, symmetric, so the zeros stay zero). Unstructured, the embedding
tables lose --embedding-percent of each row and the Linears what makes half of all these weights
(0: half of every row everywhere, also measured); 2:4 is half of every row by construction.
"post-training" is that model as it is, beside Wanda's one-shot pruning (|W| x ||X||, no update,
half of every row) for reference; "+ distillation" is the float model teaching the pruned, fake-
quantized copy on --sentences Wikipedia first sentences (documents from 256 on, no labels; at most
4,744, which stay clear of the re-check set) for --budget seconds, with --loss (layers: every
layer's token states; embedding: the last layer's) and Adam from --lr. "zeros" is the share of
zeros measured in all those weights of the model. Judged by the cosine of mean-pooled embeddings to
fp32 on 256 held-out sentences (documents 0-255) and 256 others (documents 5,000-5,255);
"recovered" is the share of the post-training loss (1 − cosine) that distillation wins back.

Size: each model is saved with the torch runtime; a pruned weight is stored as a deflated bitmask
and its deflated kept values (lowbit.formats.sparse). Ratios are to plain w8's tensor file and
whole folder (tokenizer files included). For reference, plain w8's tensor file deflated whole
(zlib level 9) is printed too: what compression alone would give. This CPU has no sparse kernel:
a pruned model runs the same dense int8 kernels, so it is smaller, not faster.

    .venv/bin/python -m bench.prune [--budget 900] [--batch-size 16] [--calibration 1024]
        [--embedding-percent 60] [--sentences 2000] [--loss layers] [--lr 3e-4]
        [--patterns unstructured,2:4] [--threads 2]

Writes bench/results/prune.json (prune-unstructured.json, prune-2of4.json for one pattern).
"""

from __future__ import annotations

import tempfile
import textwrap
import time
import zlib
from pathlib import Path

import lowbit
from bench.common import bench_arguments, print_table, write_json
from bench.qat import HELD_OUT, TRAIN, minilm_setup, recovered
from lowbit.data import assets
from lowbit.evaluate import folder_bytes
from lowbit.families import transformers as hf
from lowbit.nn.kinds import module_kind
from lowbit.transform.quantize import quantized_modules

TENSOR_FILE = "model.lowbit.safetensors"
RECHECK_OFFSET = HELD_OUT["cosine, re-check"][1]  # the re-check sentences start here: training stops before


def sizes(model, folder: Path) -> dict[str, int]:
    lowbit.save(model, folder, runtime="torch")
    return {"tensor file bytes": (folder / TENSOR_FILE).stat().st_size, "folder bytes": folder_bytes(folder)}


def recoveries(ptq: dict[str, float], trained: dict[str, float]) -> dict[str, float]:
    return {"recovered": recovered(ptq["cosine"], trained["cosine"]),
            "recovered, re-check": recovered(ptq["cosine, re-check"], trained["cosine, re-check"])}


def zero_share(model) -> float:
    """Share of zeros in the weights of the model's Linears and embedding tables (float or
    quantized: a quantized module's integer weight is zero where its float one was pruned)."""
    modules = [*quantized_modules(model).values(),
               *(module for module in model.modules() if module_kind(module) in ("linear", "embedding"))]
    weights = [module.weight for module in modules]
    return sum(int((weight == 0).sum()) for weight in weights) / sum(weight.numel() for weight in weights)


def linear_share(model, embedding_share: float) -> float:
    """The share of every Linear's weights to prune so that, with `embedding_share` of the
    embedding tables', half of all their weights go."""
    counts = {"linear": 0, "embedding": 0}
    for module in model.modules():
        if module_kind(module) in counts:
            counts[module_kind(module)] += module.weight.numel()
    return (0.5 * sum(counts.values()) - embedding_share * counts["embedding"]) / counts["linear"]


def shares(pattern: str, model, embedding_percent: int) -> dict:
    """prune's sparsity and overrides for `pattern`: unstructured with --embedding-percent."""
    if pattern == "2:4" or not embedding_percent:
        return {"sparsity": 0.5}
    embedding_share = embedding_percent / 100
    return {"sparsity": round(linear_share(model, embedding_share), 4),
            "overrides": {"embeddings*": embedding_share}}


def ratios(stored: dict[str, int], dense: dict[str, int]) -> dict[str, float]:
    return {"tensor file / w8": stored["tensor file bytes"] / dense["tensor file bytes"],
            "folder / w8": stored["folder bytes"] / dense["folder bytes"]}


def post_training_rows(setup, pattern: str, calibration: list, embedding_percent: int):
    """Rows of Wanda's and SparseGPT's one-shot pruning (each allocation), and the SparseGPT-pruned
    float model the last allocation gives, with its post-training scores, to distil."""
    model, scores = f"50% {pattern} + w8", setup.scores
    wanda = lowbit.prune(setup.fp32, 0.5, pattern, calibration=calibration, criterion="wanda")
    wanda = lowbit.quantize(wanda, "w8", progress=False)
    rows = [{"model": model, "method": "Wanda, post-training", **scores(wanda), "zeros": zero_share(wanda)}]
    allocations = {"half of every row": {"sparsity": 0.5}}
    harder = shares(pattern, setup.fp32, embedding_percent)
    if harder != allocations["half of every row"]:
        allocations[f"embeddings {embedding_percent}%, Linears {harder['sparsity']:.1%}"] = harder
    for allocation, chosen in allocations.items():
        start = time.perf_counter()
        pruned = lowbit.prune(setup.fp32, pattern=pattern, calibration=calibration, criterion="sparsegpt",
                              **chosen)
        quantized = lowbit.quantize(pruned, "w8", progress=False)
        ptq = scores(quantized)
        rows.append({"model": model, "method": f"SparseGPT ({allocation}), post-training", **ptq,
                     "zeros": zero_share(quantized), "minutes": (time.perf_counter() - start) / 60})
    return rows, pruned, ptq, allocation


def check_arguments(args) -> list[str]:
    """The patterns asked for; exits on a pattern or sentence count this bench cannot take."""
    patterns, first = args.patterns.split(","), TRAIN[1]
    if not set(patterns) <= {"unstructured", "2:4"}:
        raise SystemExit("--patterns takes unstructured, 2:4 or both (comma-separated)")
    if not 0 < args.sentences <= RECHECK_OFFSET - first:
        raise SystemExit(f"--sentences must be in 1..{RECHECK_OFFSET - first} (documents {first} to "
                         f"{RECHECK_OFFSET - 1}; the re-check set starts at {RECHECK_OFFSET})")
    return patterns


def training_sentences(setup, count: int) -> list[str]:
    """The first `count` sentences from document 256 on (setup.train holds the first 2,000)."""
    return setup.train[:count] if count <= len(setup.train) else assets.wikipedia_sentences(count, TRAIN[1])


def main() -> None:
    args = bench_arguments(__doc__, runs=None,
                           extra={"--budget": 900, "--batch-size": 16, "--calibration": 1024,
                                  "--embedding-percent": 60, "--sentences": 2000, "--loss": "layers",
                                  "--lr": 3e-4, "--patterns": "unstructured,2:4"})
    patterns = check_arguments(args)
    setup = minilm_setup()
    fp32, tokenizer, train, scores = setup.fp32, setup.tokenizer, setup.train, setup.scores
    texts = training_sentences(setup, args.sentences)
    calibration = [hf.tokenize(tokenizer, train[start : start + 16])
                   for start in range(0, args.calibration, 16)]

    with tempfile.TemporaryDirectory() as scratch:
        plain = lowbit.quantize(fp32, "w8", progress=False)
        dense = sizes(plain, Path(scratch) / "w8")
        deflated = len(zlib.compress((Path(scratch) / "w8" / TENSOR_FILE).read_bytes(), 9))
        rows = [{"model": "w8 (dense)", "method": "post-training", **scores(plain), **dense}]
        for pattern in patterns:
            pruned_rows, pruned, ptq, allocation = post_training_rows(setup, pattern, calibration,
                                                                      args.embedding_percent)
            rows += pruned_rows
            start = time.perf_counter()
            prepared = lowbit.qat.prepare(pruned, "w8", progress=False)
            result = lowbit.distill(prepared, fp32, texts, tokenizer=tokenizer, time_budget=args.budget,
                                    batch_size=args.batch_size, lr=args.lr, loss=args.loss)
            converted = lowbit.qat.convert(prepared, progress=False)
            minutes = (time.perf_counter() - start) / 60
            trained, stored = scores(converted), sizes(converted, Path(scratch) / pattern.replace(":", "of"))
            rows.append({"model": f"50% {pattern} + w8", "method": f"SparseGPT ({allocation}) + distillation",
                         **trained, **recoveries(ptq, trained), "zeros": zero_share(converted), **stored,
                         **ratios(stored, dense), "steps": result.steps, "minutes": minutes,
                         "curve": result.curve})
    print_table(f"50% pruning + int8 vs plain w8, MiniLM, {args.threads} threads, measured now", rows,
                [("model", "model"), ("method", "method"), ("cosine", "cosine"), ("recovered", "recovered"),
                 ("cosine, re-check", "cosine (re-check)"), ("zeros", "zeros"),
                 ("tensor file / w8", "file / w8"), ("folder / w8", "folder / w8"), ("steps", "steps"),
                 ("minutes", "minutes")])
    share = deflated / dense["tensor file bytes"]
    print(textwrap.fill(f"plain w8's tensor file deflated whole (zlib 9): {share:.3f} of it. No sparse "
                        "kernel on this CPU: pruned models run the dense int8 kernels (smaller, not "
                        "faster).", 80))
    payload = {"threads": args.threads, "budget_s": args.budget, "batch_size": args.batch_size,
               "calibration_sentences": args.calibration, "embedding_percent": args.embedding_percent,
               "training_sentences": args.sentences, "loss": args.loss, "lr": args.lr,
               "w8_tensor_file_deflated_bytes": deflated, "rows": rows}
    name = "prune" if len(patterns) > 1 else f"prune-{patterns[0].replace(':', 'of')}"
    print(f"results: {write_json(name, payload)}")


if __name__ == "__main__":
    main()
