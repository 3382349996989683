"""Quantization-aware training, as `lowbit.qat`: prepare a float model, train it (with your own
loop or `distill`), convert it to the quantized model.

    prepared = lowbit.qat.prepare(model, "w4")
    lowbit.qat.distill(prepared, model, texts, tokenizer=tokenizer, time_budget=600)
    quantized = lowbit.qat.convert(prepared)
    lowbit.save(quantized, "out/model-w4-qat")

or, after post-training quantization of an LLM, train only its group scales and norms (every
integer kept, so the file is the same size and a GGUF recipe still exports):

    quantized = lowbit.quantize(model, "q4_0-awq-gptq", calibration=batches)
    lowbit.qat.tune_scales(quantized, model, batches, time_budget=600)
"""

from lowbit.transform.distill import DistillationError, DistillResult, distill
from lowbit.transform.qat import convert, prepare
from lowbit.transform.scale_tuning import tune_scales

__all__ = ["DistillResult", "DistillationError", "convert", "distill", "prepare", "tune_scales"]
