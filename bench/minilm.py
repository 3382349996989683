"""all-MiniLM-L6-v2: fp32 vs lowbit (PyTorch and ONNX Runtime runtimes) vs torch.ao quantize_dynamic vs
ONNX Runtime fp32 and int8, side by side.

Measures, in one process on the same data and thread count: embedding cosine to fp32 on 256
Wikipedia sentences (embedded one at a time), topic accuracy of a logistic-regression head
trained on fp32 embeddings (fixed random held-out split of the 12-topic corpus), latency at
batch 1 × one short sentence and batch 8 × 128 tokens, and size on disk. Prints one table with
ratios against fp32 and the best peer; writes bench/results/minilm.json.

    .venv/bin/python -m bench.minilm [--threads 2] [--runs 30]
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

import lowbit
from bench.common import (
    bench_arguments,
    export_onnx,
    interleaved_p50,
    onnx_bytes,
    onnx_int8,
    onnx_session,
    print_table,
    write_json,
)
from lowbit.data import assets
from lowbit.evaluate import folder_bytes, mean_cosine
from lowbit.families import transformers as hf

Runner = Callable[[dict], np.ndarray]
ONNX_CONTENDERS = {  # lowbit models on the onnxruntime runtime: (recipe, MatMulNBits accuracy level)
    "lowbit w8a8-dynamic ort": ("w8a8-dynamic", 0),  # DynamicQuantizeMatMul: per-tensor activations
    "lowbit w8 ort": ("w8", 0), "lowbit w8 ort int8-act": ("w8", 4),
    "lowbit w4 ort": ("w4", 0), "lowbit w4 ort int8-act": ("w4", 4),
}
# ONNX Runtime's int8 model in a session that does not fuse skip + layer norm, as lowbit's sessions
# do: it shows what lowbit's graph gains beyond that one session option. Not a peer as its users run it.
UNFUSED_PEER = "ort int8, unfused norm"
GPTQ_RECIPE = lowbit.make_recipe("w4-gptq", granularity="group:128")  # w4's groups, rounded by GPTQ


def gptq_calibration(tokenizer) -> list[dict]:
    """32 batches of 16 texts from the end of the Wikipedia corpus (the scored sentences and the
    topic split come from elsewhere in it)."""
    texts = [document["extract"] for document in assets.wikipedia_documents()[-512:]]
    return [hf.tokenize(tokenizer, texts[start : start + 16], 128) for start in range(0, len(texts), 16)]


class LastHidden(torch.nn.Module):
    """A positional-argument wrapper for export: (input_ids, attention_mask) -> last_hidden_state."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def build_models(tokenizer, threads: int, scratch: Path) -> tuple[dict[str, Runner], dict[str, int]]:
    """Every contender as a function batch -> last hidden state, and its size on disk."""
    from transformers import AutoModel

    path = assets.minilm_path()
    fp32 = AutoModel.from_pretrained(str(path), attn_implementation="eager").eval()
    quantized = lowbit.quantize(fp32, "w8a8-dynamic", progress=False)
    lowbit.save(quantized, scratch / "lowbit", runtime="torch")
    for recipe, level in ONNX_CONTENDERS.values():  # saved and loaded as a user would
        lowbit.save(lowbit.quantize(fp32, recipe, progress=False), scratch / f"{recipe}-{level}",
                    runtime="onnxruntime", accuracy_level=level)
    gptq = lowbit.quantize(fp32, GPTQ_RECIPE, calibration=gptq_calibration(tokenizer), progress=False)
    lowbit.save(gptq, scratch / "w4-gptq", runtime="torch")
    lowbit.save(gptq, scratch / "w4-gptq-ort", runtime="onnxruntime", accuracy_level=4)
    torchao = torch.ao.quantization.quantize_dynamic(fp32, {torch.nn.Linear}, dtype=torch.qint8)
    torch.save(torchao.state_dict(), scratch / "torchao.pt")
    sample = hf.tokenize(tokenizer, ["An example sentence to trace the graph."])
    dim = torch.export.Dim
    dynamic = {name: {0: dim("batch"), 1: dim("sequence")} for name in ("input_ids", "attention_mask")}
    onnx_fp32 = export_onnx(LastHidden(fp32), (sample["input_ids"], sample["attention_mask"]),
                            ["input_ids", "attention_mask"], "last_hidden_state",
                            scratch / "fp32.onnx", dynamic)
    onnx_q = onnx_int8(onnx_fp32, scratch / "int8.onnx")

    def torch_runner(model) -> Runner:
        return lambda batch: model(**batch).last_hidden_state.numpy()

    def ort_runner(onnx_path, fuse_skip_norm: bool = True) -> Runner:
        session = onnx_session(onnx_path, threads, fuse_skip_norm)
        return lambda batch: session.run(None, {"input_ids": batch["input_ids"].numpy(),
                                                "attention_mask": batch["attention_mask"].numpy()})[0]

    runners = {"fp32": torch_runner(fp32), "lowbit w8a8-dynamic": torch_runner(quantized)}
    runners.update({name: torch_runner(lowbit.load(scratch / f"{recipe}-{level}"))
                    for name, (recipe, level) in ONNX_CONTENDERS.items()})
    runners.update({"lowbit w4-gptq": torch_runner(gptq),
                    "lowbit w4-gptq ort int8-act": torch_runner(lowbit.load(scratch / "w4-gptq-ort")),
                    "torch.ao dynamic": torch_runner(torchao), "ort fp32": ort_runner(onnx_fp32),
                    "ort int8": ort_runner(onnx_q), UNFUSED_PEER: ort_runner(onnx_q, fuse_skip_norm=False)})
    sizes = {"fp32": folder_bytes(path / "model.safetensors"),
             "lowbit w8a8-dynamic": folder_bytes(scratch / "lowbit"),
             "lowbit w4-gptq": folder_bytes(scratch / "w4-gptq"),
             "lowbit w4-gptq ort int8-act": onnx_bytes(scratch / "w4-gptq-ort" / "model.onnx"),
             "torch.ao dynamic": folder_bytes(scratch / "torchao.pt"),
             "ort fp32": onnx_bytes(onnx_fp32), "ort int8": onnx_bytes(onnx_q),
             UNFUSED_PEER: onnx_bytes(onnx_q)}
    sizes.update({name: onnx_bytes(scratch / f"{recipe}-{level}" / "model.onnx")
                  for name, (recipe, level) in ONNX_CONTENDERS.items()})
    return runners, sizes


def embed(run: Runner, tokenizer, texts: list[str], batch_size: int) -> np.ndarray:
    """Mean-pooled embeddings of `texts`."""
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = hf.tokenize(tokenizer, texts[start : start + batch_size], 128)
            hidden, mask = run(batch), batch["attention_mask"].numpy()[..., None].astype(np.float32)
            chunks.append((hidden * mask).sum(1) / np.clip(mask.sum(1), 1, None))
    return np.concatenate(chunks)


def topic_split() -> tuple[list[str], np.ndarray, int]:
    """First sentences and topics of 1,200 training and 400 held-out documents (fixed shuffle:
    the corpus is sorted by topic)."""
    documents = assets.wikipedia_documents()
    order = np.random.default_rng(0).permutation(len(documents))[:1600]
    texts = [documents[i]["extract"].split(". ")[0] for i in order]
    return texts, np.array([documents[i]["topic"] for i in order]), 1200


def quality(runners: dict[str, Runner], tokenizer) -> dict[str, dict[str, float]]:
    sentences = assets.wikipedia_sentences(256)
    reference = torch.from_numpy(embed(runners["fp32"], tokenizer, sentences, 1))
    texts, topics, train = topic_split()
    features = {name: embed(run, tokenizer, texts, 32) for name, run in runners.items()}
    head = LogisticRegression(max_iter=2000).fit(features["fp32"][:train], topics[:train])
    return {name: {
        "cosine": mean_cosine(reference, torch.from_numpy(embed(run, tokenizer, sentences, 1))),
        "topic_accuracy": float(np.mean(head.predict(features[name][train:]) == topics[train:])),
    } for name, run in runners.items()}


def latency(runners: dict[str, Runner], tokenizer, runs: int) -> dict[str, dict[str, float]]:
    sentences = assets.wikipedia_sentences(8)
    batches = {"b1": hf.tokenize(tokenizer, sentences[:1]),
               "b8x128": dict(tokenizer(sentences, padding="max_length", truncation=True,
                                        max_length=128, return_tensors="pt"))}
    return {label: interleaved_p50({name: (lambda r=run, b=batch: r(b)) for name, run in runners.items()},
                                   runs if label == "b1" else max(5, runs // 6))
            for label, batch in batches.items()}


def main() -> None:
    args = bench_arguments(__doc__)
    tokenizer = hf.load_tokenizer(assets.minilm_path())
    with tempfile.TemporaryDirectory(prefix="lowbit-bench-") as scratch:
        runners, sizes = build_models(tokenizer, args.threads, Path(scratch))
        scores = quality(runners, tokenizer)
        timings = latency(runners, tokenizer, args.runs)
    peers = [name for name in runners if name not in ("fp32", UNFUSED_PEER) and not name.startswith("lowbit")]
    best_peer = min(timings["b1"][name] for name in peers)
    rows = [{"model": name, "size_mb": sizes[name] / 1e6, **scores[name],
             "b1_ms": timings["b1"][name], "b1_vs_fp32": timings["b1"]["fp32"] / timings["b1"][name],
             "b1_vs_best_peer": best_peer / timings["b1"][name], "b8x128_ms": timings["b8x128"][name],
             "b8_vs_fp32": timings["b8x128"]["fp32"] / timings["b8x128"][name]}
            for name in runners]
    print_table(f"all-MiniLM-L6-v2, {args.threads} threads, measured now (×: speed-up, above 1 is faster)",
                rows, [("model", "model"), ("size_mb", "MB"), ("cosine", "cosine (256 sent.)"),
                       ("topic_accuracy", "topic acc."), ("b1_ms", "batch 1 ms"), ("b1_vs_fp32", "× fp32"),
                       ("b1_vs_best_peer", "× best peer"), ("b8x128_ms", "batch 8×128 ms"),
                       ("b8_vs_fp32", "× fp32")])
    print(f"results: {write_json('minilm', {'threads': args.threads, 'rows': rows})}")


if __name__ == "__main__":
    main()
