"""Quantization-aware training, as `lowbit.qat`: prepare a float model, train it (with your own
loop or `distill`), convert it to the quantized model.

    prepared = lowbit.qat.prepare(model, "w4")
    lowbit.qat.distill(prepared, model, texts, tokenizer=tokenizer, time_budget=600)
    quantized = lowbit.qat.convert(prepared)
    lowbit.save(quantized, "out/model-w4-qat")
"""

from lowbit.transform.distill import DistillationError, DistillResult, distill
from lowbit.transform.qat import convert, prepare

__all__ = ["DistillResult", "DistillationError", "convert", "distill", "prepare"]
