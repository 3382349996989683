"""Pruning + int8 with distillation (lowbit.prune, lowbit.distill) on all-MiniLM-L6-v2: quality
and file size against plain w8, on held-out data.

Every Linear and embedding table is pruned to 50% (unstructured: half of each row; 2:4: two of
every four inputs) by SparseGPT on the first --calibration training sentences (each Linear's
kept weights updated to make up for the pruned ones; the embedding tables by magnitude), then
quantized w8 (int8 per channel, symmetric, so the zeros stay zero). "post-training" is that
model as it is, beside Wanda's one-shot pruning (|W| x ||X||, no update) for reference;
"+ distillation" is the float model teaching the SparseGPT-pruned, fake-quantized copy on 2,000
Wikipedia first sentences (documents 256-2,255, no labels) for --budget seconds. Judged by
the cosine of mean-pooled embeddings to fp32 on 256 held-out sentences (documents 0-255) and 256
others (documents 5,000-5,255); "recovered" is the share of the post-training loss (1 − cosine)
that distillation wins back.

Size: each model is saved with the torch runtime; a pruned weight is stored as a deflated bitmask
and its deflated kept values (lowbit.formats.sparse). Ratios are to plain w8's tensor file and
whole folder (tokenizer files included). For reference, plain w8's tensor file deflated whole
(zlib level 9) is printed too: what compression alone would give. This CPU has no sparse kernel:
a pruned model runs the same dense int8 kernels, so it is smaller, not faster. Writes
bench/results/prune.json.

    .venv/bin/python -m bench.prune [--budget 900] [--batch-size 16] [--calibration 1024] [--threads 2]
"""

from __future__ import annotations

import tempfile
import time
import zlib
from pathlib import Path

import lowbit
from bench.common import bench_arguments, print_table, write_json
from bench.qat import minilm_setup, recovered
from lowbit.evaluate import folder_bytes
from lowbit.families import transformers as hf

TENSOR_FILE = "model.lowbit.safetensors"


def sizes(model, folder: Path) -> dict[str, int]:
    lowbit.save(model, folder, runtime="torch")
    return {"tensor file bytes": (folder / TENSOR_FILE).stat().st_size, "folder bytes": folder_bytes(folder)}


def recoveries(ptq: dict[str, float], trained: dict[str, float]) -> dict[str, float]:
    return {"recovered": recovered(ptq["cosine"], trained["cosine"]),
            "recovered, re-check": recovered(ptq["cosine, re-check"], trained["cosine, re-check"])}


def ratios(stored: dict[str, int], dense: dict[str, int]) -> dict[str, float]:
    return {"tensor file / w8": stored["tensor file bytes"] / dense["tensor file bytes"],
            "folder / w8": stored["folder bytes"] / dense["folder bytes"]}


def main() -> None:
    args = bench_arguments(__doc__, runs=None,
                           extra={"--budget": 900, "--batch-size": 16, "--calibration": 1024})
    setup = minilm_setup()
    fp32, tokenizer, train, scores = setup.fp32, setup.tokenizer, setup.train, setup.scores
    calibration = [hf.tokenize(tokenizer, train[start : start + 16])
                   for start in range(0, args.calibration, 16)]

    with tempfile.TemporaryDirectory() as scratch:
        plain = lowbit.quantize(fp32, "w8", progress=False)
        dense = sizes(plain, Path(scratch) / "w8")
        deflated = len(zlib.compress((Path(scratch) / "w8" / TENSOR_FILE).read_bytes(), 9))
        rows = [{"model": "w8 (dense)", "method": "post-training", **scores(plain), **dense}]
        for pattern in ("unstructured", "2:4"):
            model = f"50% {pattern} + w8"
            wanda = lowbit.prune(fp32, 0.5, pattern, calibration=calibration, criterion="wanda")
            rows.append({"model": model, "method": "Wanda, post-training",
                         **scores(lowbit.quantize(wanda, "w8", progress=False))})
            start = time.perf_counter()
            pruned = lowbit.prune(fp32, 0.5, pattern, calibration=calibration, criterion="sparsegpt")
            ptq = scores(lowbit.quantize(pruned, "w8", progress=False))
            rows.append({"model": model, "method": "SparseGPT, post-training", **ptq,
                         "minutes": (time.perf_counter() - start) / 60})
            start = time.perf_counter()
            prepared = lowbit.qat.prepare(pruned, "w8", progress=False)
            result = lowbit.distill(prepared, fp32, train, tokenizer=tokenizer, time_budget=args.budget,
                                    batch_size=args.batch_size, lr=1e-4)
            converted = lowbit.qat.convert(prepared, progress=False)
            minutes = (time.perf_counter() - start) / 60
            trained, stored = scores(converted), sizes(converted, Path(scratch) / pattern.replace(":", "of"))
            rows.append({"model": model, "method": "SparseGPT + distillation", **trained,
                         **recoveries(ptq, trained), **stored, **ratios(stored, dense),
                         "steps": result.steps, "minutes": minutes, "curve": result.curve})
    print_table(f"50% pruning + int8 vs plain w8, MiniLM, {args.threads} threads, measured now", rows,
                [("model", "model"), ("method", "method"), ("cosine", "cosine"), ("recovered", "recovered"),
                 ("cosine, re-check", "cosine (re-check)"), ("tensor file / w8", "file / w8"),
                 ("folder / w8", "folder / w8"), ("steps", "steps"), ("minutes", "minutes")])
    share = deflated / dense["tensor file bytes"]
    print(f"plain w8's tensor file deflated whole (zlib 9): {share:.3f} of it. No sparse kernel on this "
          "CPU: pruned models run the dense int8 kernels (smaller, not faster).")
    payload = {"threads": args.threads, "budget_s": args.budget, "batch_size": args.batch_size,
               "calibration_sentences": args.calibration,
               "w8_tensor_file_deflated_bytes": deflated, "rows": rows}
    print(f"results: {write_json('prune', payload)}")


if __name__ == "__main__":
    main()
