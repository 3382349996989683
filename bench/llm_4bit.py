"""4-bit SmolLM2-135M: lowbit's algorithms (round-to-nearest, GPTQ, AWQ) against llama.cpp's quantizer,
side by side on the same tokens.

Measures perplexity over the first --tokens tokens of the Wikipedia corpus (sliding windows of
512, stride 256, each token scored once), for lowbit's rows also over --tokens tokens of other
extracts (the re-check), the saved file's size, the quantize time, and the peak
RSS while quantizing (Linux's high-water mark, reset before each; the float model already loaded
is the baseline).
GPTQ and AWQ calibrate on --calibration sequences of 512 tokens from the end of the corpus, which the
scored tokens never reach. lowbit rows keep the tied embedding and LM head at int8 per row (as
llama.cpp keeps its output tensor above 4 bits); "int4 head" rows quantize it like the blocks.
llama.cpp rows (Q4_0, Q4_K_M) appear when llama-cpp-python is installed (`make bench-llamacpp`).
ONNX Runtime rows: the fp32 model exported as bench.smollm2 does, then quantized by
`MatMulNBitsQuantizer` at groups of 64, asymmetric, in its calibration-free modes (its default
block quantizer, HQQ, and RTN through Intel Neural Compressor), as its users run them.
optimum-quanto row: `quantize(model, weights=qint4)` and `freeze`, its default groups, the LM head
(tied to the float32 embedding) left in float, saved with torch.save.
Decode speed: greedy tokens per second after a 64-token prompt, the median of --runs interleaved
rounds in shuffled order (bench.smollm2.decode_speed); lowbit rows decode from their folder saved
for ONNX Runtime with int8 activations (`runtime="onnxruntime", accuracy_level=4`), the fp32 and
quanto models in PyTorch, ONNX Runtime's with its cached-step graph, llama.cpp's in llama.cpp.
"tuned scales": after quantizing, the group scales and norms train for --tune-steps steps of one
calibration sequence against the float model, every integer kept (lowbit.qat.tune_scales).
--rows keeps the lowbit rows whose names hold one of its comma-separated parts; --peers 0 leaves
out ONNX Runtime, quanto and llama.cpp.
Writes bench/results/llm_4bit.json.

    .venv/bin/python -m bench.llm_4bit [--threads 2] [--tokens 4096] [--calibration 128] [--runs 3]
        [--tune-steps 64] [--rows "GPTQ,tuned"] [--peers 0]
"""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path

import torch

import lowbit
from bench import llamacpp
from bench.common import bench_arguments, print_table, write_json
from bench.smollm2 import (
    PROMPT_TOKENS,
    Contender,
    decode_speed,
    export_cached_step,
    lowbit_onnx_contender,
    onnx_contender,
    perplexity,
    torch_contender,
)
from lowbit.data import assets
from lowbit.data.batches import language_model_windows
from lowbit.evaluate import folder_bytes
from lowbit.evaluate.memory import current_rss_bytes, peak_rss_bytes
from lowbit.families import transformers as hf

HEAD_INT8 = {"lm_head": "w8", "model.embed_tokens": "w8"}
RECIPES = {
    "lowbit RTN g64, int4 head": lowbit.make_recipe("w4-g64"),
    "lowbit RTN g64": lowbit.make_recipe("w4-g64", overrides=HEAD_INT8),
    "lowbit GPTQ g64": lowbit.make_recipe("w4-gptq", overrides=HEAD_INT8),
    "lowbit HQQ g64": lowbit.make_recipe("w4-hqq", overrides=HEAD_INT8),
    "lowbit AWQ g64": lowbit.make_recipe("w4-awq", overrides=HEAD_INT8),
    "lowbit AWQ+GPTQ sym g32": lowbit.make_recipe("q4_0-awq-gptq"),
    "lowbit AWQ+GPTQ sym g32, tuned scales": lowbit.make_recipe("q4_0-awq-gptq"),
}
TUNED = ", tuned scales"  # rows whose group scales and norms then train (lowbit.qat.tune_scales)


class PeakMemory:
    """The process's peak resident set size while the block runs: Linux's high-water mark
    (VmHWM), reset on entry by writing 5 to /proc/self/clear_refs."""

    def __enter__(self) -> PeakMemory:
        Path("/proc/self/clear_refs").write_text("5")
        return self

    def __exit__(self, *_) -> None:
        self.peak = peak_rss_bytes()


def calibration_batches(tokenizer, texts: list[str], sequences: int) -> list[dict]:
    """`sequences` runs of 512 tokens from the end of the corpus."""
    ids = tokenizer("\n\n".join(texts[-3000:]), return_tensors="pt")["input_ids"][0]
    return [{"input_ids": ids[start : start + 512][None]} for start in range(0, 512 * sequences, 512)]


def smollm2_workload(tokens: int, sequences: int) -> tuple[Path, list[dict], list[dict], torch.nn.Module]:
    """SmolLM2's float32 folder, the scored windows of the first `tokens` Wikipedia tokens, the
    calibration batches (`sequences` × 512 tokens from the corpus' end), and the float32 model."""
    from transformers import AutoModelForCausalLM

    path = hf.smollm2_path()
    tokenizer = hf.load_tokenizer(path)
    texts = [document["extract"] for document in assets.wikipedia_documents()]
    windows = language_model_windows(tokenizer, texts, 512, tokens)
    calibration = calibration_batches(tokenizer, texts, sequences)
    fp32 = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return path, windows, calibration, fp32


RECHECK_FROM = 5000  # the re-check text: Wikipedia extracts from this one on (scored and calibration
# text come from the corpus' start and end)


def recheck_windows(tokens: int) -> list[dict]:
    """Windows over `tokens` tokens of other Wikipedia text, to re-check the perplexities on."""
    tokenizer = hf.load_tokenizer(hf.smollm2_path())
    texts = [document["extract"] for document in assets.wikipedia_documents()[RECHECK_FROM:]]
    return language_model_windows(tokenizer, texts, 512, tokens)


def lowbit_rows(fp32, windows, calibration, scratch: Path, contenders: dict[str, Contender],
                names: list[str], tune_steps: int, recheck: list[dict]) -> list[dict]:
    rows, served = [], {}
    baseline = current_rss_bytes()
    untuned = {}  # a row's model and seconds, kept when its tuned row follows: quantized once
    for name in names:
        base, start = name.removesuffix(TUNED), time.perf_counter()
        with PeakMemory() as memory:
            if base in untuned:  # its quantize seconds count in this row's
                quantized, base_seconds = untuned.pop(base)
                start -= base_seconds
            else:
                quantized = lowbit.quantize(fp32, RECIPES[name], calibration=calibration)
            if name != base:
                lowbit.qat.tune_scales(quantized, fp32, calibration, steps=tune_steps)
        seconds = time.perf_counter() - start
        if name + TUNED in names:
            untuned[name] = (copy.deepcopy(quantized), seconds)
        folder = lowbit.save(quantized, scratch / name.replace(" ", "-").replace(",", ""), runtime="torch")
        served[name] = lowbit.save(quantized, folder.with_name(folder.name + "-ort"), runtime="onnxruntime",
                                   accuracy_level=4)
        rows.append({"model": name, "perplexity": perplexity(lambda ids, q=quantized: q(ids).logits, windows),
                     "recheck": perplexity(lambda ids, q=quantized: q(ids).logits, recheck),
                     "size_mb": folder_bytes(folder) / 1e6, "quantize_s": seconds,
                     "peak_rss_gb": memory.peak / 1e9, "rss_over_model_gb": (memory.peak - baseline) / 1e9})
        print(rows[-1], flush=True)
        del quantized
    # loaded only now, so that no row's peak memory holds the sessions of the rows before it
    contenders.update({name: lowbit_onnx_contender(folder) for name, folder in served.items()})
    return rows


def llamacpp_rows(windows, threads: int, contenders: dict[str, Contender]) -> list[dict]:
    if not llamacpp.available():
        print("llama.cpp is not installed: `make bench-llamacpp` builds it and adds its rows")
        return []
    rows = []
    for kind in ("Q4_0", "Q4_K_M"):
        start = time.perf_counter()
        path = llamacpp.quantized_gguf(kind, threads)
        seconds = time.perf_counter() - start  # 0 when the file was already cached
        model = llamacpp.LlamaCpp(path, threads)
        contenders[f"llama.cpp {kind}"] = Contender(model.logits, model.timed_decode, model.size_bytes)
        rows.append({"model": f"llama.cpp {kind}", "size_mb": path.stat().st_size / 1e6,
                     "perplexity": perplexity(model.logits, windows),
                     "quantize_s": seconds})
        print(rows[-1], flush=True)
    return rows


def quanto_rows(fp32, windows, scratch: Path, contenders: dict[str, Contender]) -> list[dict]:
    """optimum-quanto as its users run it: `quantize(model, weights=qint4)` and `freeze`, int4
    weights in its default groups, float activations, the LM head left in float (transformers'
    quanto integration leaves the output embedding so)."""
    try:
        from optimum.quanto import freeze, qint4, quantize
    except ImportError:
        print("optimum-quanto is not installed (make bench installs it): no row for it")
        return []
    model = copy.deepcopy(fp32)
    start = time.perf_counter()
    with PeakMemory() as memory:
        quantize(model, weights=qint4, exclude=["lm_head"])
        freeze(model)
    seconds = time.perf_counter() - start
    path = scratch / "quanto.pt"  # as its users save it (torch.save; the tied float table once)
    torch.save(model.state_dict(), path)

    def logits(ids: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(False), torch.no_grad():  # quanto's tensors refuse inference mode
            return model(ids.clone()).logits

    plain = torch_contender(model, path.stat().st_size)

    def decode(prompt: torch.Tensor, new_tokens: int) -> tuple[float, float]:
        with torch.inference_mode(False), torch.no_grad():
            return plain.decode(prompt.clone(), new_tokens)

    contenders["optimum-quanto qint4"] = Contender(logits, decode, plain.size_bytes)

    row = {"model": "optimum-quanto qint4", "perplexity": perplexity(logits, windows),
           "size_mb": path.stat().st_size / 1e6, "quantize_s": seconds,
           "peak_rss_gb": memory.peak / 1e9}
    print(row, flush=True)
    return [row]


ORT_MODES = ("default", "HQQ", "RTN")


def ort_config(mode: str):
    """MatMulNBitsQuantizer's algorithm config for `mode`, at groups of 64 where it takes one."""
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    return {"default": lambda: nbits.DefaultWeightOnlyQuantConfig(block_size=64, is_symmetric=False),
            "HQQ": lambda: nbits.HQQWeightOnlyQuantConfig(block_size=64),
            "RTN": nbits.RTNWeightOnlyQuantConfig}[mode]()


def ort_rows(fp32, windows, threads: int, scratch: Path, contenders: dict[str, Contender]) -> list[dict]:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    source = export_cached_step(fp32, scratch / "fp32.onnx")
    rows = []
    for mode in ORT_MODES:
        target, label = scratch / f"ort-{mode}.onnx", f"ORT MatMulNBits {mode} g64"
        start = time.perf_counter()
        try:
            with PeakMemory() as memory:
                quantizer = MatMulNBitsQuantizer(str(source), block_size=64, is_symmetric=False,
                                                 algo_config=ort_config(mode))
                quantizer.process()
                quantizer.model.save_model_to_file(str(target))
        except Exception as error:  # noqa: BLE001 - a peer's failure is a result to report
            failure = f"{type(error).__name__}: {error}"
            rows.append({"model": label, "failed": failure})
            print(rows[-1], flush=True)
            continue
        seconds = time.perf_counter() - start
        model = contenders[label] = onnx_contender(target, fp32.config, threads)
        rows.append({"model": label, "perplexity": perplexity(model.logits, windows),
                     "size_mb": target.stat().st_size / 1e6, "quantize_s": seconds,
                     "peak_rss_gb": memory.peak / 1e9})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    args = bench_arguments(__doc__, runs=3, extra={"--tokens": 4096, "--calibration": 128, "--tune-steps": 64,
                                                   "--rows": "", "--peers": 1})
    names = [name for name in RECIPES if not args.rows or any(part in name for part in args.rows.split(","))]
    path, windows, calibration, fp32 = smollm2_workload(args.tokens, args.calibration)
    size = folder_bytes(path / "model.safetensors")
    recheck = recheck_windows(args.tokens)
    rows = [{"model": "fp32", "perplexity": perplexity(lambda ids: fp32(ids).logits, windows),
             "recheck": perplexity(lambda ids: fp32(ids).logits, recheck),
             "size_mb": size / 1e6}]
    contenders = {"fp32": torch_contender(fp32, size)}
    with tempfile.TemporaryDirectory(prefix="lowbit-bench-") as scratch:
        rows += lowbit_rows(fp32, windows, calibration, Path(scratch), contenders, names, args.tune_steps,
                            recheck)
        if args.peers:
            rows += ort_rows(fp32, windows, args.threads, Path(scratch), contenders)
            rows += quanto_rows(fp32, windows, Path(scratch), contenders)
            rows += llamacpp_rows(windows, args.threads, contenders)
        with torch.inference_mode():
            speeds = decode_speed(contenders, windows[0]["input_ids"][:, :PROMPT_TOKENS], args.runs)
    for row in rows:
        if "perplexity" in row:
            row["perplexity_vs_fp32"] = row["perplexity"] / rows[0]["perplexity"]
        if "recheck" in row:
            row["recheck_vs_fp32"] = row["recheck"] / rows[0]["recheck"]
        if row["model"] in speeds:
            row["decode_tokens_per_second"] = speeds[row["model"]]["decode_tokens_per_second"]
    print_table(f"SmolLM2-135M at 4 bits, perplexity over {args.tokens} tokens, GPTQ calibrated on "
                f"{args.calibration} × 512 tokens, {args.threads} threads",
                rows, [("model", "model"), ("perplexity", "perplexity"), ("perplexity_vs_fp32", "× fp32"),
                       ("recheck_vs_fp32", "re-check × fp32"), ("size_mb", "MB"),
                       ("quantize_s", "quantize s"), ("peak_rss_gb", "peak RSS GB"),
                       ("rss_over_model_gb", "RSS over fp32 GB"),
                       ("decode_tokens_per_second", "decode tok/s")])
    payload = {"threads": args.threads, "tokens": args.tokens, "calibration": args.calibration,
               "tune_steps": args.tune_steps, "recheck_from_extract": RECHECK_FROM, "rows": rows}
    print(f"results: {write_json('llm_4bit', payload)}")


if __name__ == "__main__":
    main()
