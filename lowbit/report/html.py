"""A Comparison as one self-contained HTML file: tables plus plots embedded as PNG (no network)."""

from __future__ import annotations

import base64
import html
import io

from lowbit.report.markdown import _number, summary_rows


def _figure_png(draw) -> str:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(7, 3.2), dpi=110)
    draw(axes)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    pyplot.close(figure)
    return base64.b64encode(buffer.getvalue()).decode()


def _latency_plot(comparison):
    def draw(axes):
        data, labels = [], []
        for batch in comparison.original["latency_ms"]:
            for name in ("original", "quantized"):
                data.append(getattr(comparison, name)["latency_ms"][batch].get("timings_ms") or [0.0])
                labels.append(f"{name}\nbatch {batch}")
        axes.boxplot(data, showfliers=True)
        axes.set_xticks(range(1, len(labels) + 1), labels, fontsize=8)
        axes.set_ylabel("ms per call")
        axes.set_title("Latency distributions")

    return _figure_png(draw)


def _size_plot(comparison):
    def draw(axes):
        keys = [("size_bytes", "on disk"), ("param_bytes", "in memory"), ("peak_rss_bytes", "peak RSS")]
        present = [(k, label) for k, label in keys
                   if comparison.original.get(k) and comparison.quantized.get(k)]
        for offset, name in ((-0.2, "original"), (0.2, "quantized")):
            values = [getattr(comparison, name)[k] / 2**20 for k, _ in present]
            axes.bar([i + offset for i in range(len(present))], values, width=0.4, label=name)
        axes.set_xticks(range(len(present)), [label for _, label in present])
        axes.set_ylabel("MiB")
        axes.legend()
        axes.set_title("Size")

    return _figure_png(draw)


def _layer_plot(comparison):
    layers = comparison.layers[:30]

    def draw(axes):
        values = [min(layer["sqnr_db"], 80.0) for layer in layers]
        axes.barh(range(len(layers)), values)
        axes.set_yticks(range(len(layers)), [layer["name"] for layer in layers], fontsize=6)
        axes.invert_yaxis()
        axes.set_xlabel("output SQNR, dB (higher is better)")
        axes.set_title("Worst layers")

    return _figure_png(draw)


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _verdict_lines(verdict: dict) -> list[str]:
    return [*verdict["lines"], *(f"warning: {warning}" for warning in verdict["timing_warnings"])]


def render_html(comparison) -> str:
    verdict = comparison.verdict()
    quality_rows = [[name, _number(e["original"]), _number(e["quantized"]), _number(e["delta"]),
                     f"[{_number(e['ci95'][0])}, {_number(e['ci95'][1])}]"]
                    for name, e in comparison.quality.items()]
    layer_rows = [[layer["name"], _number(layer["sqnr_db"], 3), layer["scheme"],
                   f"{layer['weight']} {layer['granularity']}", layer["kernel"]]
                  for layer in comparison.layers]
    images = [_latency_plot(comparison), _size_plot(comparison)]
    if comparison.layers:
        images.append(_layer_plot(comparison))
    status = "PASS" if verdict["passed"] else "FAIL"
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>lowbit compare</title><style>",
        "body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}",
        "td,th{border:1px solid #ccc;padding:.2em .6em;text-align:right}td:first-child{text-align:left}",
        ".FAIL{color:#b00}.PASS{color:#070}</style></head><body>",
        f"<h1>lowbit compare: {html.escape(comparison.metric)} "
        f"<span class='{status}'>{status}</span></h1>",
        "<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in _verdict_lines(verdict)) + "</ul>",
        _table(["measure", "original", "quantized", "change"], [list(r) for r in summary_rows(comparison)]),
        "<h2>Quality</h2>",
        _table(["metric", "original", "quantized", "change", "95% interval"], quality_rows),
        "<h2>Per layer (worst first)</h2>",
        _table(["layer", "SQNR dB", "scheme", "weight", "kernel"], layer_rows),
        "<h2>Plots</h2>",
        *[f"<img alt='plot' src='data:image/png;base64,{image}'>" for image in images],
        f"<p><small>settings: {html.escape(str(comparison.settings))}</small></p></body></html>",
    ]
    return "\n".join(parts)
