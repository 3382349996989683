"""lowbit's GGUF files against llama.cpp's own quantizer, every file measured by llama.cpp itself.

SmolLM2-135M: the float32 model is exported by lowbit as an F32 GGUF (the baseline) and quantized
both ways from the same weights:
- llama.cpp's quantizer: Q8_0, Q4_0, Q4_1, Q4_K_M, and Q4_K_M with an importance matrix computed
  by llama-imatrix from the calibration text (when `make bench-gguf` has built llama.cpp's tools);
- lowbit: `q8_0`, `q5_0`, `q4_0` and `q4_1` (round-to-nearest), `q5_0-gptq`, `q5_0-awq-gptq`,
  `q4_0-gptq`, `q4_0-awq-gptq` and `q4_1-gptq` (GPTQ, AWQ + GPTQ, calibrated on the same text),
  written by `lowbit.export_gguf` (`lowbit export --format gguf`); --recipes picks some. With
  --tune-steps, each calibrated one is also written after that many steps of scale tuning
  (lowbit.qat.tune_scales: its group scales and norms trained against the float model on the
  calibration sequences, every integer kept).
  Q5_0 is where llama.cpp's Q4_K_M puts most of this model: its 576-wide rows are not a multiple
  of Q4_K's 256, and llama.cpp falls back to Q5_0 for them. SmolLM2's Linear weights were
  published as Q4_1 blocks: a Q4_1 file of them (llama.cpp's or lowbit's) holds them exactly, so
  its rows measure the file format, not how well 4 bits round a trained model.
Perplexity: llama.cpp's logits over the first --tokens tokens of the Wikipedia corpus (sliding
windows of 512, stride 256, each token scored once), the same token ids for every file.
Calibration: --calibration sequences of 512 tokens from the end of the corpus, which the scored
tokens never reach. Decode: greedy tokens/s in llama.cpp after a 64-token prompt, median of
--runs interleaved rounds. Writes bench/results/gguf_export.json.

    .venv/bin/python -m bench.gguf_export [--threads 2] [--tokens 4096] [--calibration 128] [--runs 5]
        [--recipes q8_0,q5_0-awq-gptq,...] [--tune-steps 64]
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

import lowbit
from bench import llamacpp
from bench.common import bench_arguments, print_table, write_json
from bench.llm_4bit import smollm2_workload
from bench.smollm2 import Contender, decode_speed, perplexity
from lowbit.families import transformers as hf

LOWBIT_RECIPES = ("q8_0", "q5_0", "q5_0-gptq", "q5_0-awq-gptq", "q4_0", "q4_0-gptq", "q4_0-awq-gptq", "q4_1",
                  "q4_1-gptq")
LLAMACPP_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q4_K_M")
# llama.cpp's llama-imatrix and llama-quantize, built by `make bench-gguf`
TOOLS = Path(os.environ.get("LOWBIT_LLAMACPP_TOOLS", Path.home() / ".cache/lowbit/llama.cpp-tools"))
NEW_TOKENS = 64


def llamacpp_quantize(source: Path, target: Path, kind: str, threads: int) -> float:
    """llama.cpp's quantizer through its library (llama-cpp-python): seconds taken."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = llamacpp.GGUF_TYPES[kind], threads
    start = time.perf_counter()
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params)):
        raise RuntimeError(f"llama.cpp could not quantize {source} to {kind}")
    return time.perf_counter() - start


def imatrix_quantize(source: Path, target: Path, calibration_text: Path, chunks: int,
                     threads: int) -> float | None:
    """Q4_K_M with an importance matrix from `calibration_text`, by llama.cpp's own tools: seconds
    taken (importance matrix and quantization), or None when the tools are not built."""
    imatrix, quantize = TOOLS / "llama-imatrix", TOOLS / "llama-quantize"
    if not (imatrix.is_file() and quantize.is_file()):
        print(f"llama.cpp's tools are not in {TOOLS}: `make bench-gguf` builds them (the imatrix row)")
        return None
    matrix = target.with_suffix(".imatrix.gguf")
    start = time.perf_counter()
    subprocess.run([str(imatrix), "-m", str(source), "-f", str(calibration_text), "-o", str(matrix),
                    "-c", "512", "--chunks", str(chunks), "-t", str(threads), "-b", "512"],
                   check=True, capture_output=True)
    subprocess.run([str(quantize), "--imatrix", str(matrix), str(source), str(target), "Q4_K_M",
                    str(threads)], check=True, capture_output=True)
    return time.perf_counter() - start


def lowbit_files(fp32, folder: Path, calibration, scratch: Path, recipes: list[str],
                 tune_steps: int) -> dict[str, dict]:
    """Each recipe's GGUF file; with `tune_steps`, each calibrated one's also after that many steps
    of scale tuning (lowbit.qat.tune_scales), its seconds counting the quantization's."""
    files = {}
    for recipe in recipes:
        start = time.perf_counter()
        calibrated = lowbit.make_recipe(recipe).algorithm != "rtn"  # GPTQ and AWQ read calibration text
        quantized = lowbit.quantize(fp32, recipe, calibration=calibration if calibrated else None)
        seconds = time.perf_counter() - start
        path = scratch / f"lowbit-{recipe}.gguf"
        lowbit.export_gguf(quantized, folder, path)
        files[f"lowbit {recipe}"] = {"path": path, "quantize_s": seconds}
        print(f"lowbit {recipe}: quantized in {seconds:.0f} s", flush=True)
        if calibrated and tune_steps:
            lowbit.qat.tune_scales(quantized, fp32, calibration, steps=tune_steps)
            path = scratch / f"lowbit-{recipe}-tuned.gguf"
            lowbit.export_gguf(quantized, folder, path)
            files[f"lowbit {recipe}, tuned scales"] = {"path": path,
                                                       "quantize_s": time.perf_counter() - start}
        del quantized
    return files


def llamacpp_files(source: Path, calibration_text: Path, chunks: int, scratch: Path, threads: int) -> dict:
    files = {}
    for kind in LLAMACPP_TYPES:
        path = scratch / f"llama.cpp-{kind}.gguf"
        seconds = llamacpp_quantize(source, path, kind, threads)
        files[f"llama.cpp {kind}"] = {"path": path, "quantize_s": seconds}
    path = scratch / "llama.cpp-Q4_K_M-imatrix.gguf"
    seconds = imatrix_quantize(source, path, calibration_text, chunks, threads)
    if seconds is not None:
        files["llama.cpp Q4_K_M + imatrix"] = {"path": path, "quantize_s": seconds}
    return files


def decode_speeds(files: dict[str, dict], prompt: torch.Tensor, threads: int,
                  rounds: int) -> dict[str, float]:
    """Median greedy decode tokens/s of each file over `rounds` interleaved rounds (one untimed first)."""
    contenders = {}
    for name, entry in files.items():
        model = llamacpp.LlamaCpp(entry["path"], threads, context=256)
        contenders[name] = Contender(model.logits, model.timed_decode, model.size_bytes)
    speeds = decode_speed(contenders, prompt, rounds, NEW_TOKENS)
    return {name: speed["decode_tokens_per_second"] for name, speed in speeds.items()}


def main() -> None:
    args = bench_arguments(__doc__, runs=5, extra={"--tokens": 4096, "--calibration": 128,
                                                   "--recipes": ",".join(LOWBIT_RECIPES), "--tune-steps": 0})
    recipes = args.recipes.split(",")
    if unknown := sorted(set(recipes) - set(LOWBIT_RECIPES)):
        raise SystemExit(f"unknown --recipes {', '.join(unknown)}; choose from {', '.join(LOWBIT_RECIPES)}")
    if not llamacpp.available():
        raise SystemExit("llama.cpp is not installed: run `make bench-gguf` (it builds llama-cpp-python)")
    folder, windows, calibration, fp32 = smollm2_workload(args.tokens, args.calibration)
    tokenizer = hf.load_tokenizer(folder)
    torch_fp32 = perplexity(lambda ids: fp32(ids).logits, windows)
    with tempfile.TemporaryDirectory(prefix="lowbit-bench-gguf-") as scratch_name:
        scratch = Path(scratch_name)
        source = scratch / "fp32.gguf"
        lowbit.export_gguf(fp32, folder, source)
        calibration_text = scratch / "calibration.txt"
        calibration_text.write_text(tokenizer.decode(torch.cat([b["input_ids"][0] for b in calibration])))
        files = {"fp32 (F32)": {"path": source, "quantize_s": 0.0}}
        files |= llamacpp_files(source, calibration_text, args.calibration, scratch, args.threads)
        files |= lowbit_files(fp32, folder, calibration, scratch, recipes, args.tune_steps)
        fp32 = None  # its memory back before the files are read
        rows = []
        for name, entry in files.items():
            model = llamacpp.LlamaCpp(entry["path"], args.threads)
            rows.append({"model": name, "perplexity": perplexity(model.logits, windows),
                         "size_mb": entry["path"].stat().st_size / 1e6, "quantize_s": entry["quantize_s"]})
            print(rows[-1], flush=True)
            del model
        prompt = windows[0]["input_ids"][:, :64]
        speeds = decode_speeds({n: e for n, e in files.items() if n != "fp32 (F32)"}, prompt, args.threads,
                               args.runs)
        shutil.rmtree(scratch, ignore_errors=True)
    for row in rows:
        row["perplexity_vs_fp32"] = row["perplexity"] / rows[0]["perplexity"]
        row["decode_tokens_per_second"] = speeds.get(row["model"])
    print_table(f"SmolLM2-135M GGUF files in llama.cpp: perplexity over {args.tokens} tokens (PyTorch "
                f"fp32: {torch_fp32:.3f}), calibration {args.calibration} × 512 tokens, "
                f"{args.threads} threads",
                rows, [("model", "file"), ("perplexity", "perplexity"), ("perplexity_vs_fp32", "× fp32"),
                       ("size_mb", "MB"), ("quantize_s", "quantize s"),
                       ("decode_tokens_per_second", "decode tok/s")])
    payload = {"threads": args.threads, "tokens": args.tokens, "calibration": args.calibration,
               "tune_steps": args.tune_steps,
               "torch_fp32_perplexity": torch_fp32, "rows": rows}
    print(f"results: {write_json('gguf_export', payload)}")


if __name__ == "__main__":
    main()
