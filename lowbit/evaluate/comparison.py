"""`Comparison`: every figure of an original-vs-quantized run, the verdict, and its JSON form.

The JSON layout is stable (documented in docs/compare-json.md): `original` and `quantized` each
hold size_bytes, param_bytes, peak_rss_bytes, load_seconds, latency_ms (p50/p95/p99/mean per
batch size), throughput and the quality metric; then `quality`, `delta`, `layers`, `verdict`,
`settings`. Non-finite numbers (the SQNR of identical outputs is +inf) are written as strings.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lowbit.evaluate.metrics import speedup_interval
from lowbit.registry import Registry

SCHEMA_VERSION = 1
ROUNDING = 1e-9  # 0.7575 - 0.7525 is 0.00500000000000000444 in floating point
SPREAD_LIMIT = 2.0  # p95 / p50 above this: the timings were too unsteady to trust
DEFAULT_RELATIVE_DROP = 0.01  # the quality budget of a verdict when the caller sets none: 1% worse

# (result kind, format) -> renderer; lowbit.report fills it (a face renders, the measure layer does not)
RENDERERS: Registry[Callable[[Any], str]] = Registry("report renderer")


def finite_json(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def quality_drop(entry: dict[str, Any], relative: bool = False) -> float:
    """How much worse the quantized model is (positive = worse), absolute or relative."""
    change = entry["quantized"] - entry["original"]
    drop = -change if entry["higher_is_better"] else change
    if relative:
        base = abs(entry["original"])
        return drop / base if base and math.isfinite(base) else math.inf
    return drop


def _speed_word(entry: dict[str, Any]) -> str:
    if entry["faster"]:
        return "faster than the original"
    if entry["slower"]:
        return "SLOWER than the original"
    return "same speed as the original within noise"


@dataclass
class Comparison:
    """Measured side-by-side of an original and a quantized model (see module docstring)."""

    original: dict[str, Any]
    quantized: dict[str, Any]
    quality: dict[str, dict[str, Any]]
    metric: str
    layers: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    max_drop: float | None = None
    relative: bool = False

    @property
    def speedups(self) -> dict[str, float]:
        """Original p50 / quantized p50 per batch size (above 1 = quantized is faster)."""
        return {
            batch: self.original["latency_ms"][batch]["p50"] / self.quantized["latency_ms"][batch]["p50"]
            for batch in self.original.get("latency_ms", {})
            if batch in self.quantized.get("latency_ms", {})
        }

    def speed_verdicts(self) -> dict[str, dict[str, Any]]:
        """Per batch size: the speed-up, its 95% interval, and faster / slower / within noise.

        A model is called faster or slower only when the whole interval lies above or below 1, so
        the call does not flip from run to run on a noisy machine; a tie says so.
        """
        verdicts = {}
        for batch, ratio in self.speedups.items():
            low, high = speedup_interval(self.original["latency_ms"][batch].get("timings_ms", ()),
                                         self.quantized["latency_ms"][batch].get("timings_ms", ()))
            if not (math.isfinite(low) and math.isfinite(high)):
                low = high = ratio
            verdicts[batch] = {"speedup": ratio, "ci95": [low, high], "faster": low > 1.0,
                               "slower": high < 1.0}
        return verdicts

    def timing_warnings(self) -> list[str]:
        """Why the timings may not be trusted: a machine busier than its cores, or a large spread
        between a model's median and its 95th percentile."""
        warnings = []
        load, cores = self.settings.get("load_average"), self.settings.get("cores")  # usable cores
        if load is not None and cores and load > cores:
            warnings.append(f"the machine was busy while timing (load average {load:.1f} on {cores} "
                            "cores): speed figures may be off; re-run on a quiet machine")
        for name, report in (("original", self.original), ("quantized", self.quantized)):
            for batch, entry in report.get("latency_ms", {}).items():
                if entry.get("p50") and entry.get("p95", 0) > SPREAD_LIMIT * entry["p50"]:
                    warnings.append(f"{name} at batch {batch}: p95 is {entry['p95'] / entry['p50']:.1f}× "
                                    "the median; timings were unsteady (more --runs, a quieter machine)")
        return warnings

    def quality_verdict(self) -> tuple[bool | None, str | None]:
        """Within the quality budget or not, and the line that says so. Without `max_drop` the
        default budget holds: at most DEFAULT_RELATIVE_DROP worse than the original, relative."""
        if self.metric not in self.quality:
            return None, None
        given = self.max_drop is not None
        if not given and not math.isfinite(self.quality[self.metric]["original"]):
            return None, None  # e.g. the SQNR of identical outputs: no relative budget applies
        budget, relative = (self.max_drop, self.relative) if given else (DEFAULT_RELATIVE_DROP, True)
        drop = quality_drop(self.quality[self.metric], relative)
        within = drop <= budget + ROUNDING  # as tune accepts a trial
        unit = "relative " if relative else ""
        source = "" if given else " (the default budget; set your own with max_drop / --max-drop)"
        return within, (f"{self.metric}: {unit}drop {drop + 0.0:.4g} {'within' if within else 'OVER'} "
                        f"the budget {budget:g}{source}")

    def verdict(self) -> dict[str, Any]:
        """Faster, slower or a tie at each batch size, and quality within its budget.

        It fails when the quantized model is measurably slower at some batch size, or its quality
        drops more than the budget (the caller's `max_drop`, else DEFAULT_RELATIVE_DROP).
        """
        speed = self.speed_verdicts()
        lines = [f"batch {batch}: {_speed_word(entry)} ({entry['speedup']:.2f}×, 95% interval "
                 f"{entry['ci95'][0]:.2f}–{entry['ci95'][1]:.2f})" for batch, entry in speed.items()]
        within, line = self.quality_verdict()
        if line:
            lines.append(line)
        passed = not any(entry["slower"] for entry in speed.values()) and within is not False
        return {"speed": speed, "within_budget": within, "max_drop": self.max_drop,
                "relative": self.relative, "passed": passed, "lines": lines,
                "timing_warnings": self.timing_warnings()}

    def delta(self) -> dict[str, Any]:
        size = self.original.get("size_bytes"), self.quantized.get("size_bytes")
        return {
            "size_ratio": size[0] / size[1] if all(size) else None,
            "speedup": self.speedups,
            "quality": {name: entry["delta"] for name, entry in self.quality.items()},
        }

    def to_dict(self) -> dict[str, Any]:
        return finite_json({
            "schema_version": SCHEMA_VERSION,
            "metric": self.metric,
            "original": self.original,
            "quantized": self.quantized,
            "quality": self.quality,
            "delta": self.delta(),
            "layers": self.layers,
            "verdict": self.verdict(),
            "settings": self.settings,
        })

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def to_markdown(self) -> str:
        return RENDERERS.get(("comparison", "markdown"))(self)  # the report face renders it

    def to_html(self) -> str:
        return RENDERERS.get(("comparison", "html"))(self)
