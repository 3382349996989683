"""`lowbit.tune` on real models: the budget, the trials, the sensitivity ranking, the choice.

    .venv/bin/python -m bench.tune --model minilm [--objective size|latency] [--time-budget 900]
    .venv/bin/python -m bench.tune --model efficientnet
    .venv/bin/python -m bench.tune --model smollm2

- minilm: topic classification, all-MiniLM-L6-v2 mean-pooled embeddings + a logistic-regression
  head trained on fp32 embeddings of 1,200 Wikipedia first sentences (12 topics); tuned on 400
  held-out ones, metric accuracy, --max-drop 0.005.
- efficientnet: EfficientNet-Lite0 static int8 on the scikit-image photos, metric top-1
  agreement with fp32, --max-drop 0.01, calibrated on the photos mirrored.
- smollm2: SmolLM2-135M, perplexity over 2,048 Wikipedia tokens (context 512), --max-drop 0.02
  relative, objective size.
Prints the tune report and writes bench/results/tune-MODEL-OBJECTIVE.json (and .html).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from torch import nn

import lowbit
from bench.common import RESULTS
from lowbit.data import assets
from lowbit.data.datasets import Dataset
from lowbit.families import transformers as hf


class TopicClassifier(nn.Module):
    """MiniLM encoder, mask-weighted mean pooling, and a linear topic head."""

    def __init__(self, encoder: nn.Module, head: nn.Linear):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0))


def minilm_task(args) -> dict:
    from sklearn.linear_model import LogisticRegression
    from transformers import AutoModel

    from bench.minilm import topic_split

    path = assets.minilm_path()
    tokenizer = hf.load_tokenizer(path)
    encoder = AutoModel.from_pretrained(str(path), attn_implementation="eager").eval()
    texts, topics, train = topic_split()
    features = hf.embed(encoder, tokenizer, texts[:train], batch_size=32).numpy()
    logistic = LogisticRegression(max_iter=2000).fit(features, topics[:train])
    head = nn.Linear(features.shape[1], len(logistic.classes_))
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(logistic.coef_))
        head.bias.copy_(torch.from_numpy(logistic.intercept_))
    classes = {name: index for index, name in enumerate(logistic.classes_)}
    data = Dataset(texts=texts[train:], labels=np.array([classes[t] for t in topics[train:]]))
    return {"model": TopicClassifier(encoder, head).eval(), "data": data, "tokenizer": tokenizer,
            "metric": "accuracy", "max_drop": 0.005, "relative": False, "batch_size": 1}


def efficientnet_task(args) -> dict:
    from lowbit.data import assets

    images = assets.sample_photos()
    return {"model": assets.efficientnet_lite0(), "data": images, "metric": "agreement", "max_drop": 0.01,
            "relative": False, "batch_size": 1, "calibration": list(images.flip(-1).split(4)),
            "candidates": ["w8a8-static", "w8", "fp16"]}


def smollm2_task(args) -> dict:
    from transformers import AutoModelForCausalLM

    path = hf.smollm2_path()
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    tokenizer = hf.load_tokenizer(path)
    text = []
    for document in assets.wikipedia_documents():
        text.append(document["extract"])
        if len(tokenizer("\n\n".join(text))["input_ids"]) > 2100:
            break
    return {"model": model, "data": Dataset(texts=text), "tokenizer": tokenizer,
            "metric": "perplexity", "max_drop": 0.02, "relative": True, "batch_size": 1, "seq_len": 512,
            "candidates": ["w4-g64", "w8a8-dynamic", "w8", "fp16"], "proxy_batches": 1, "runs": 5}


TASKS = {"minilm": minilm_task, "efficientnet": efficientnet_task, "smollm2": smollm2_task}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(TASKS), required=True)
    parser.add_argument("--objective", choices=("size", "latency"), default="size")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds after which no new trial starts (default: 900, SmolLM2 750: its "
                        "last trial and the final comparison take a few minutes more)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    task = TASKS[args.model](args)
    time_budget = args.time_budget or (750.0 if args.model == "smollm2" else 900.0)
    started = time.perf_counter()
    result = lowbit.tune(task.pop("model"), task.pop("data"), objective=args.objective,
                         time_budget=time_budget, samples=None, **task)
    elapsed = time.perf_counter() - started
    from rich.console import Console
    from rich.markdown import Markdown

    Console(width=140).print(Markdown(result.to_markdown()))
    print(f"tune took {elapsed:.0f} s ({args.threads} threads)")
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"tune-{args.model}-{args.objective}"
    stem.with_suffix(".json").write_text(json.dumps({**result.to_dict(), "tune_seconds": elapsed}, indent=2))
    stem.with_suffix(".html").write_text(result.to_html())
    print(f"results: {stem.with_suffix('.json')}")


if __name__ == "__main__":
    main()
