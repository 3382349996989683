"""`lowbit batch` over a folder of real models, as a user runs it, then run again.

The folder holds MiniLM and SmolLM2-135M (transformers folders), EfficientNet-Lite0 (a factory
named in lowbit-batch.json, with scikit-image's photos as its data), an MLP fitted on
scikit-learn's digits (joblib) and a deliberately corrupt joblib file. A data map gives MiniLM
Wikipedia sentences, SmolLM2 Wikipedia extracts (perplexity) and the MLP held-out digits. The
command runs once (`--workers`, default 1; `--ray local` for Ray tasks), then again: the second
run must do nothing but print the table. Prints both wall times and writes
bench/results/batch.json.

    .venv/bin/python -m bench.batch [--workers 1] [--ray local] [--recipe w8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import joblib
import numpy as np
from safetensors.torch import save_file
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

from bench.common import write_json
from lowbit.data import assets
from lowbit.families import transformers as hf

ROOT = Path(__file__).parents[1]


def build_folder(scratch: Path) -> tuple[Path, Path]:
    """The models folder and its data map."""
    models, data = scratch / "models", scratch / "data"
    models.mkdir()
    data.mkdir()
    (models / "minilm").symlink_to(assets.minilm_path(), target_is_directory=True)
    (models / "smollm2").symlink_to(hf.smollm2_path(), target_is_directory=True)
    save_file({"input": assets.sample_photos().contiguous()}, data / "photos.safetensors")
    (models / "lowbit-batch.json").write_text(json.dumps({"models": {"efficientnet": {
        "factory": "lowbit.data.assets:efficientnet_lite0", "data": "../data/photos.safetensors"}}}))
    digits = load_digits()
    train, held_out, labels, _ = train_test_split(digits.data, digits.target, test_size=0.3, random_state=0)
    classifier = MLPClassifier((256,), max_iter=500, random_state=0).fit(train, labels)
    joblib.dump(classifier, models / "digits-mlp.joblib")
    np.save(data / "digits.npy", held_out)
    good = (models / "digits-mlp.joblib").read_bytes()
    (models / "churn-forest.joblib").write_bytes(good[: len(good) // 3])  # cut short: corrupt
    assets.write_wikipedia_jsonl(data / "sentences.jsonl", 128)
    texts = [{"text": document["extract"]} for document in assets.wikipedia_documents()[-64:]]
    (data / "extracts.jsonl").write_text("".join(json.dumps(text) + "\n" for text in texts))
    data_map = data / "map.json"
    data_map.write_text(json.dumps({"minilm": "sentences.jsonl", "smollm2": "extracts.jsonl",
                                    "digits-mlp": "digits.npy"}))
    return models, data_map


def lowbit_batch(models: Path, out: Path, data_map: Path, extra: list[str]) -> tuple[float, str, int]:
    """(wall seconds, the output, exit code) of the command."""
    command = [sys.executable, "-m", "lowbit.cli", "batch", str(models), "--out", str(out),
               "--data-map", str(data_map), "--trust-pickle", *extra]
    start = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "80"})
    return time.monotonic() - start, result.stdout + result.stderr, result.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--ray", default=None)
    parser.add_argument("--recipe", default="w8a8-dynamic")
    args = parser.parse_args()
    extra = ["--workers", str(args.workers), "--recipe", args.recipe]
    extra += ["--ray", args.ray] if args.ray else []
    with tempfile.TemporaryDirectory(prefix="lowbit-batch-") as scratch:
        models, data_map = build_folder(Path(scratch))
        out = Path(scratch) / "quantized"
        first = lowbit_batch(models, out, data_map, extra)
        print(f"first run: {first[0]:.0f} s, exit {first[2]}\n{first[1]}")
        second = lowbit_batch(models, out, data_map, extra)
        print(f"second run: {second[0]:.1f} s, exit {second[2]}\n{second[1]}")
        summary = json.loads((out / "batch.json").read_text())
    payload = {"command": f"lowbit batch MODELS --out OUT --data-map MAP --trust-pickle {' '.join(extra)}",
               "first_run_seconds": first[0], "first_exit": first[2], "second_run_seconds": second[0],
               "second_exit": second[2], "second_output": second[1], "summary": summary}
    print(f"results: {write_json('batch', payload)}")


if __name__ == "__main__":
    main()
