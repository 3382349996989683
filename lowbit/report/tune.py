"""A TuneResult as Markdown and as one self-contained HTML file: the choice, every trial, and the
sensitivity ranking (table and plot)."""

from __future__ import annotations

import html
from collections import Counter

from lowbit.report.html import _figure_png, _table
from lowbit.report.markdown import _number

TRIAL_HEADER = ["trial", "quality", "drop", "MiB", "× original speed", "seconds", "outcome"]


def _speed(trial) -> str:
    """The trial's speed-up, and "ORT" (with its accuracy level) when ONNX Runtime ran it."""
    if trial.speedup is None:
        return "n/a"
    runtime = getattr(trial, "runtime", "eager")
    return f"{trial.speedup:.2f}" + ("" if runtime == "eager" else f" (ORT, level {trial.accuracy_level})")


def _trial_rows(result) -> list[list[str]]:
    return [[trial.label, _number(trial.quality), _number(trial.drop), f"{trial.size_bytes / 2**20:.2f}",
             _speed(trial), f"{trial.seconds:.1f}", trial.reason]
            for trial in result.trials]


def _sensitivity_rows(block: dict, top: int) -> list[list[str]]:
    return [[row["name"], _number(row["sqnr_db"], 3),
             _number(row["drop_alone"]) if "drop_alone" in row else "", f"{row['scheme']} {row['weight']}"]
            for row in block["modules"][:top]]


def _header(result) -> list[str]:
    unit = "relative " if result.relative else ""
    lines = [f"{result.message}",
             f"Budget: {result.metric} {unit}drop ≤ {result.max_drop:g}; objective: {result.objective}; "
             f"original {result.metric} {_number(result.original_quality)}, "
             f"{result.original_size_bytes / 2**20:.2f} MiB in memory."]
    if result.settings.get("executor"):
        nodes = Counter(trial.node for trial in result.trials if trial.node)
        where = ", ".join(f"{node} ({count})" for node, count in nodes.items())
        lines.append(f"Trials: {result.settings['executor']}." + (f" Measured on: {where}." if where else ""))
    return lines


def render_markdown(result, top: int = 10) -> str:
    lines = ["# lowbit tune", "", *_header(result), "", "## Trials", "",
             "| " + " | ".join(TRIAL_HEADER) + " |", "|" + " --- |" * len(TRIAL_HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in _trial_rows(result)]
    for block in result.sensitivity:
        lines += ["", f"## Most sensitive modules under {block['candidate']} (output SQNR with only that "
                  "module quantized; exact metric drop for the top suspects)", "",
                  "| module | SQNR dB | drop alone | quantized as |", "| --- | ---: | ---: | --- |"]
        lines += ["| " + " | ".join(row) + " |" for row in _sensitivity_rows(block, top)]
    if result.comparison is not None:
        lines += ["", result.comparison.to_markdown().replace("# lowbit compare", "## Chosen model: compare")]
        lines += [f"- {line}" for line in nested_fail_explained(result)]
    return "\n".join(lines) + "\n"


def nested_fail_explained(result) -> list[str]:
    """Why the chosen model's comparison says FAIL although tune met its budget: which part
    failed, and why that does not contradict the choice."""
    verdict = result.comparison.verdict()
    if verdict["passed"]:
        return []
    lines = []
    slower = [f"{batch} ({entry['speedup']:.2f}×)" for batch, entry in verdict["speed"].items()
              if entry["slower"]]
    if slower:
        why = ("tune's objective was size, which asks for the smallest model within the quality "
               "budget, not for speed" if result.objective == "size" else
               "the comparison timed it again and found it slower than the trial's own timing did: "
               "timings on a busy machine move (see any warning above)")
        lines.append(f"why the comparison says FAIL: the chosen model is slower than the original at "
                     f"batch {', '.join(slower)}; {why}.")
    if verdict["within_budget"] is False:
        lines.append("why the comparison says FAIL: its own quality measurement missed the budget that "
                     "the tune trial met (it runs the model again, at its own batch sizes); see its "
                     "Quality table for the interval.")
    return lines


def _sensitivity_plot(block: dict, top: int = 25) -> str:
    rows = block["modules"][:top]

    def draw(axes):
        axes.barh(range(len(rows)), [min(row["sqnr_db"], 80.0) for row in rows])
        axes.set_yticks(range(len(rows)), [row["name"] for row in rows], fontsize=6)
        axes.invert_yaxis()
        axes.set_xlabel("model output SQNR with only this module quantized, dB (lower = more sensitive)")
        axes.set_title(f"Sensitivity under {block['candidate']}")

    return _figure_png(draw)


def render_html(result, top: int = 25) -> str:
    status = "MET" if result.met_budget else "NOT MET"
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>lowbit tune</title><style>",
        "body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}",
        "td,th{border:1px solid #ccc;padding:.2em .6em;text-align:right}td:first-child{text-align:left}",
        "</style></head><body>",
        f"<h1>lowbit tune: budget {status}</h1>",
        *[f"<p>{html.escape(line)}</p>" for line in _header(result)],
        "<h2>Trials</h2>", _table(TRIAL_HEADER, _trial_rows(result)),
    ]
    for block in result.sensitivity:
        parts += [f"<h2>Sensitivity under {html.escape(block['candidate'])}</h2>",
                  _table(["module", "SQNR dB", "drop alone", "quantized as"], _sensitivity_rows(block, top)),
                  f"<img alt='sensitivity' src='data:image/png;base64,{_sensitivity_plot(block, top)}'>"]
    if result.comparison is not None:
        body = result.comparison.to_html().split("<body>", 1)[1].rsplit("</body>", 1)[0]
        parts += ["<h2>Chosen model against the original</h2>", body]
    parts.append(f"<p><small>settings: {html.escape(str(result.settings))}</small></p></body></html>")
    return "\n".join(parts)
