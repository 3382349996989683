"""all-MiniLM-L6-v2: fp32 vs lowbit vs torch.ao quantize_dynamic vs ONNX Runtime, side by side.

Measures, in one process on the same data and thread count: embedding cosine to fp32 on 256
Wikipedia sentences, topic accuracy of a logistic-regression head trained on fp32 embeddings
(held-out split), latency at batch 1 × one short sentence and batch 8 × 128 tokens, and size on
disk. Prints one table with ratios against fp32 and the best peer, writes bench/results/minilm.json.

    .venv/bin/python bench/minilm.py [--threads 2] [--runs 30]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

import lowbit
from bench.common import (
    export_onnx,
    interleaved_p50,
    onnx_bytes,
    onnx_int8,
    onnx_session,
    print_table,
    write_json,
)
from lowbit import assets, hf
from lowbit.evaluate import folder_bytes, mean_cosine


class LastHidden(torch.nn.Module):
    """A positional-argument wrapper for export: (input_ids, attention_mask) -> last_hidden_state."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def pooled(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    mask = mask[..., None].astype(hidden.dtype)
    return (hidden * mask).sum(1) / np.clip(mask.sum(1), 1, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = assets.minilm_path()
    tokenizer = hf.load_tokenizer(path)
    from transformers import AutoModel

    fp32 = AutoModel.from_pretrained(str(path), attn_implementation="eager").eval()
    scratch = Path(tempfile.mkdtemp(prefix="lowbit-bench-"))

    lowbit_model = lowbit.quantize(fp32, "w8a8-dynamic", progress=False)
    lowbit.save(lowbit_model, scratch / "lowbit")
    torchao = torch.ao.quantization.quantize_dynamic(fp32, {torch.nn.Linear}, dtype=torch.qint8)
    torch.save(torchao.state_dict(), scratch / "torchao.pt")
    sample = hf.tokenize(tokenizer, ["An example sentence to trace the graph."])
    dim = torch.export.Dim
    dynamic = {"input_ids": {0: dim("batch"), 1: dim("sequence")},
               "attention_mask": {0: dim("batch"), 1: dim("sequence")}}
    onnx_fp32 = export_onnx(LastHidden(fp32), (sample["input_ids"], sample["attention_mask"]),
                            ["input_ids", "attention_mask"], "last_hidden_state", scratch / "fp32.onnx",
                            dynamic)
    onnx_q = onnx_int8(onnx_fp32, scratch / "int8.onnx")
    sessions = {"ort fp32": onnx_session(onnx_fp32, args.threads), "ort int8": onnx_session(onnx_q, args.threads)}

    def torch_runner(model):
        return lambda batch: model(**batch).last_hidden_state.numpy()

    def ort_runner(session):
        return lambda batch: session.run(None, {"input_ids": batch["input_ids"].numpy(),
                                                "attention_mask": batch["attention_mask"].numpy()})[0]

    runners = {"fp32": torch_runner(fp32), "lowbit w8a8-dynamic": torch_runner(lowbit_model),
               "torch.ao dynamic": torch_runner(torchao),
               **{name: ort_runner(session) for name, session in sessions.items()}}
    sizes = {"fp32": folder_bytes(path / "model.safetensors"),
             "lowbit w8a8-dynamic": folder_bytes(scratch / "lowbit"),
             "torch.ao dynamic": folder_bytes(scratch / "torchao.pt"),
             "ort fp32": onnx_bytes(onnx_fp32), "ort int8": onnx_bytes(onnx_q)}

    def embed(run, texts, batch_size):
        chunks = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                batch = hf.tokenize(tokenizer, texts[start : start + batch_size], 128)
                chunks.append(pooled(run(batch), batch["attention_mask"].numpy()))
        return np.concatenate(chunks)

    sentences = assets.wikipedia_sentences(256)
    documents = assets.wikipedia_documents()  # sorted by topic: draw a fixed random split
    order = np.random.default_rng(0).permutation(len(documents))
    train_docs = [documents[i] for i in order[:1200]]
    test_docs = [documents[i] for i in order[1200:1600]]
    first = [doc["extract"].split(". ")[0] for doc in train_docs + test_docs]
    topics = np.array([doc["topic"] for doc in train_docs + test_docs])
    reference = torch.from_numpy(embed(runners["fp32"], sentences, 1))
    fp32_features = embed(runners["fp32"], first, 32)
    head = LogisticRegression(max_iter=2000).fit(fp32_features[: len(train_docs)], topics[: len(train_docs)])

    short = hf.tokenize(tokenizer, sentences[:1])
    long_batch = dict(tokenizer(sentences[:8], padding="max_length", truncation=True, max_length=128,
                                return_tensors="pt"))
    latency = {label: interleaved_p50({name: (lambda r=run, b=batch: r(b)) for name, run in runners.items()},
                                      args.runs if label == "batch 1" else max(5, args.runs // 6))
               for label, batch in (("batch 1", short), ("batch 8x128", long_batch))}

    rows = []
    for name, run in runners.items():
        features = fp32_features if name == "fp32" else embed(run, first, 32)
        rows.append({
            "model": name, "size_mb": sizes[name] / 1e6,
            "cosine": mean_cosine(reference, torch.from_numpy(embed(run, sentences, 1))),
            "topic_accuracy": float(np.mean(head.predict(features[len(train_docs):]) == topics[len(train_docs):])),
            "b1_ms": latency["batch 1"][name], "b8x128_ms": latency["batch 8x128"][name],
        })
    peers = [row for row in rows if row["model"] not in ("fp32", "lowbit w8a8-dynamic")]
    best_peer_b1 = min(row["b1_ms"] for row in peers)
    for row in rows:
        row["b1_vs_fp32"] = latency["batch 1"]["fp32"] / row["b1_ms"]
        row["b8_vs_fp32"] = latency["batch 8x128"]["fp32"] / row["b8x128_ms"]
        row["b1_vs_best_peer"] = best_peer_b1 / row["b1_ms"]
    print_table(f"all-MiniLM-L6-v2, {args.threads} threads, measured now (×: speed-up, above 1 is faster)",
                rows, [("model", "model"), ("size_mb", "MB"), ("cosine", "cosine (256 sent.)"),
                       ("topic_accuracy", "topic acc."), ("b1_ms", "batch 1 ms"), ("b1_vs_fp32", "× fp32"),
                       ("b1_vs_best_peer", "× best peer"), ("b8x128_ms", "batch 8×128 ms"),
                       ("b8_vs_fp32", "× fp32")])
    print(f"results: {write_json('minilm', {'threads': args.threads, 'rows': rows})}")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
