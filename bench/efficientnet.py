"""EfficientNet-Lite0 on real photos: fp32 vs lowbit vs torch.ao vs ONNX Runtime, side by side.

No labelled ImageNet images install offline, so quality is measured against fp32 itself: top-1
agreement and logit SQNR on the photos scikit-image ships (resize 256, center-crop 224). Static
schemes calibrate on the same photos mirrored left-right, so no evaluated input is seen during
calibration. Latency at batch 1. Writes bench/results/efficientnet.json.

    .venv/bin/python -m bench.efficientnet [--threads 2] [--runs 30]
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

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
from lowbit.evaluate import folder_bytes, sqnr_db


def calibration_reader(images: torch.Tensor, input_name: str):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{input_name: image[None].numpy()} for image in images])

        def get_next(self):
            return next(self.batches, None)

    return Reader()


def build_contenders(fp32, calibration: torch.Tensor, threads: int, scratch: Path):
    """Every contender as a function images -> logits, and its size on disk."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    runners = {"fp32": fp32}
    sizes = {}
    batches = list(calibration.split(4))
    # The first depthwise convolution alone takes int8 weights to 18 dB logit SQNR here, so a
    # hand-made mixed-precision row keeps it in float (what `lowbit tune` is to find by itself).
    for label, recipe, skip in (("w8a8-static", "w8a8-static", None), ("w8", "w8", None),
                                ("w8a8-static, first depthwise in fp32", "w8a8-static",
                                 ["_blocks.0._depthwise_conv"])):
        quantized = lowbit.quantize(fp32, recipe, calibration=batches, skip=skip, progress=False)
        runners[f"lowbit {label}"] = quantized
        sizes[f"lowbit {label}"] = folder_bytes(lowbit.save(quantized, scratch / recipe / label,
                                                                       runtime="torch"))
        if skip is None:  # the same model in ONNX Runtime, saved and loaded as a user would
            folder = lowbit.save(quantized, scratch / recipe / f"{label} ort", runtime="onnxruntime")
            runners[f"lowbit {label} ORT"] = lowbit.load(folder)
            sizes[f"lowbit {label} ORT"] = onnx_bytes(folder / "model.onnx")
    torchao = torch.ao.quantization.quantize_dynamic(fp32, {torch.nn.Linear}, dtype=torch.qint8)
    runners["torch.ao dynamic (Linear only)"] = torchao
    torch.save(torchao.state_dict(), scratch / "torchao.pt")
    sizes["torch.ao dynamic (Linear only)"] = folder_bytes(scratch / "torchao.pt")
    onnx_fp32 = export_onnx(fp32, (calibration[:1],), ["image"], "logits", scratch / "fp32.onnx",
                            ({0: torch.export.Dim("batch")},))
    onnx_static = scratch / "static.onnx"
    quantize_static(str(onnx_fp32), str(onnx_static), calibration_reader(calibration, "image"),
                    quant_format=QuantFormat.QDQ, per_channel=True, weight_type=QuantType.QInt8,
                    activation_type=QuantType.QUInt8, reduce_range=True)
    onnx_models = {"ort fp32": onnx_fp32, "ort static int8": onnx_static}
    failures = {}
    try:
        onnx_models["ort dynamic int8"] = onnx_int8(onnx_fp32, scratch / "dyn.onnx")
    except Exception as error:  # noqa: BLE001 - a peer failing is a result to report, not a crash
        failures["ort dynamic int8"] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
    for name, path in onnx_models.items():
        session = onnx_session(path, threads)
        runners[name] = lambda x, s=session: torch.from_numpy(s.run(None, {"image": x.numpy()})[0])
        sizes[name] = onnx_bytes(path)
    return runners, sizes, failures


def main() -> None:
    args = bench_arguments(__doc__)
    fp32 = assets.efficientnet_lite0()
    images = assets.sample_photos()
    with tempfile.TemporaryDirectory(prefix="lowbit-bench-") as scratch:
        runners, sizes, failures = build_contenders(fp32, images.flip(-1), args.threads, Path(scratch))
    sizes["fp32"] = folder_bytes(assets.efficientnet_weights_path())
    with torch.inference_mode():
        logits = {name: torch.cat([run(image[None]) for image in images]) for name, run in runners.items()}
    timings = interleaved_p50({name: (lambda r=run: r(images[:1])) for name, run in runners.items()},
                              args.runs)
    reference = logits["fp32"]
    rows = [{"model": name, "size_mb": sizes[name] / 1e6,
             "agreement": float((logits[name].argmax(-1) == reference.argmax(-1)).float().mean()),
             "sqnr_db": sqnr_db(reference, logits[name]), "b1_ms": timings[name],
             "b1_vs_fp32": timings["fp32"] / timings[name],
             "b1_vs_ort_static": timings["ort static int8"] / timings[name]} for name in runners]
    print_table(f"EfficientNet-Lite0 on {len(images)} real photos, {args.threads} threads, measured now",
                rows, [("model", "model"), ("size_mb", "MB"), ("agreement", "top-1 agreement"),
                       ("sqnr_db", "logit SQNR dB"), ("b1_ms", "batch 1 ms"), ("b1_vs_fp32", "× fp32"),
                       ("b1_vs_ort_static", "× ORT static")])
    for name, reason in failures.items():
        print(f"{name}: could not be built here: {reason}")
    payload = {"threads": args.threads, "images": len(images), "rows": rows, "failures": failures}
    print(f"results: {write_json('efficientnet', payload)}")


if __name__ == "__main__":
    main()
