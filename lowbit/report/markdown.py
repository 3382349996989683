"""A Comparison as Markdown: summary table, quality with intervals, worst layers, verdict."""

from __future__ import annotations

import math
from typing import Any


def _number(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if math.isinf(value):
            return "∞" if value > 0 else "-∞"
        return f"{value:.{digits}g}"
    return str(value)


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.2f} MiB"


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{_number(value, 3)} s"


def summary_rows(comparison) -> list[tuple[str, str, str, str]]:
    """(measure, original, quantized, change) rows shared by the Markdown and terminal views."""
    original, quantized = comparison.original, comparison.quantized
    rows = []
    for key, label in (("size_bytes", "size on disk"), ("param_bytes", "parameters in memory"),
                       ("peak_rss_bytes", "peak RSS (load + 1 batch)")):
        a, b = original.get(key), quantized.get(key)
        rows.append((label, _mib(a), _mib(b), f"÷{a / b:.2f}" if a and b else "n/a"))
    a, b = original.get("load_seconds"), quantized.get("load_seconds")
    rows.append(("load time", _seconds(a), _seconds(b), f"×{a / b:.2f}" if a and b else "n/a"))
    for batch, entry in original["latency_ms"].items():
        other = quantized["latency_ms"][batch]
        for stat in ("p50", "p95", "p99"):
            rows.append((f"latency batch {batch} {stat}", f"{entry[stat]:.2f} ms", f"{other[stat]:.2f} ms",
                         f"×{entry[stat] / other[stat]:.2f}"))
        rows.append((f"throughput batch {batch}", f"{original['throughput'][batch]:.1f}/s",
                     f"{quantized['throughput'][batch]:.1f}/s",
                     f"×{quantized['throughput'][batch] / original['throughput'][batch]:.2f}"))
    if "generation" in original:
        for key, label in (("prefill_tokens_per_second", "prefill tokens/s"),
                           ("decode_tokens_per_second", "decode tokens/s")):
            a, b = original["generation"][key], quantized["generation"][key]
            rows.append((label, f"{a:.1f}", f"{b:.1f}", f"×{b / a:.2f}"))
    return rows


def _samples(settings: dict[str, Any]) -> str:
    used, available = settings.get("samples"), settings.get("available_samples")
    if available and used and available > used:
        return f"{used:,} of {available:,} samples (the first {used:,}; --samples / samples= uses more)"
    return f"{used:,} samples" if isinstance(used, int) else "all samples"


def _threads(settings: dict[str, Any]) -> str:
    threads = settings.get("threads")
    return f"{threads} threads" if threads else "the libraries' default threads"


def render_markdown(comparison, worst_layers: int = 10) -> str:
    lines = [f"# lowbit compare: {comparison.metric}", ""]
    settings = comparison.settings
    lines.append(f"{_samples(settings)}, {settings.get('kind')} model, "
                 f"{_threads(settings)}, batch sizes {settings.get('batch_sizes')} "
                 f"(quality measured at batch {settings.get('quality_batch_size')}); "
                 "every figure measured in this run.")
    if comparison.quantized.get("served") == "original":
        lines += ["", f"**The quantized model cannot serve ({comparison.quantized['fallback_reason']}); the "
                  "original was measured in its place.**"]
    lines += ["", "| measure | original | quantized | change |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in summary_rows(comparison)]
    lines += ["", "## Quality", "", "| metric | original | quantized | change | 95% interval |",
              "| --- | ---: | ---: | ---: | --- |"]
    for name, entry in comparison.quality.items():
        low, high = entry["ci95"]
        lines.append(f"| {name} | {_number(entry['original'])} | {_number(entry['quantized'])} | "
                     f"{_number(entry['delta'])} | [{_number(low)}, {_number(high)}] |")
    if comparison.layers:
        count = len(comparison.layers)
        lines += ["", f"## Worst layers (of {count}, output SQNR against the original)", ""]
        if comparison.settings.get("layers_in_pytorch"):
            lines += ["The quantized model runs in ONNX Runtime; its layers were measured in PyTorch on the "
                      "same integers (ONNX Runtime's int8 activations, if any, are not in them).", ""]
        lines += ["| layer | SQNR dB | scheme | weight | kernel |", "| --- | ---: | --- | --- | --- |"]
        for layer in comparison.layers[:worst_layers]:
            lines.append(f"| {layer['name']} | {_number(layer['sqnr_db'], 3)} | {layer['scheme']} | "
                         f"{layer['weight']} {layer['granularity']} | {layer['kernel']} |")
    verdict = comparison.verdict()
    lines += ["", "## Verdict", ""]
    lines += [f"- {line}" for line in verdict["lines"]]
    lines.append(f"- overall: {'PASS' if verdict['passed'] else 'FAIL'}")
    lines += [f"- warning: {warning}" for warning in verdict["timing_warnings"]]
    return "\n".join(lines) + "\n"
