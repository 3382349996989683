"""Shared helpers for the bench/ scripts: peers built side by side, timing, result tables.

Every number a script prints is measured in that run, on the same inputs and thread count.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text

RESULTS = Path(__file__).parent / "results"


def bench_arguments(
    description: str, runs: int | None = 30, extra: dict[str, int | float | str] | None = None,
) -> argparse.Namespace:
    """--threads and (unless `runs` is None) --runs, shared by every bench script, plus `extra`
    options with their defaults (each parsed as its default's type); sets torch's thread count."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    if runs is not None:
        parser.add_argument("--runs", type=int, default=runs)
    for option, default in (extra or {}).items():
        parser.add_argument(option, type=type(default), default=default)
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    return arguments


def onnx_session(path: Path, threads: int, fuse_skip_norm: bool = True):
    """A peer's ONNX Runtime session: `threads` intra-op threads that spin while a run is in
    flight and stop when it returns, as lowbit's own (lowbit.runtimes.onnxruntime.session); left
    spinning, they would steal the cores of whatever is timed next (that more than doubled
    PyTorch's latency here). The graph optimizer runs as ONNX Runtime's users get it, fusing
    skip + layer norm, unless `fuse_skip_norm=False` (what lowbit's sessions do)."""
    from lowbit.runtimes.onnxruntime import session

    return session(Path(path), threads=threads, fuse_skip_norm=fuse_skip_norm)


def export_onnx(module: torch.nn.Module, args: tuple, names: list[str], outputs: str | list[str],
                path: Path, dynamic: dict) -> Path:
    """Export with torch's dynamo exporter (the TorchScript exporter mis-exports MiniLM here)."""
    outputs = [outputs] if isinstance(outputs, str) else outputs
    torch.onnx.export(module, args, str(path), input_names=names, output_names=outputs,
                      dynamic_shapes=dynamic, dynamo=True, verbose=False)
    return path


def onnx_int8(source: Path, target: Path) -> Path:
    """ONNX Runtime dynamic int8: per-channel weights, reduce_range (no saturation without VNNI)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True,
                     reduce_range=True)
    return target


def interleaved_p50(calls: dict[str, Callable[[], object]], runs: int, block: int = 5) -> dict[str, float]:
    """Median milliseconds per call, in interleaved blocks: each model in turn makes one untimed
    call, then `block` timed ones, round after round, until each has `runs` timings. Outside load
    hits every model alike, and the untimed call absorbs what the previous model left behind
    (ONNX Runtime's worker threads keep spinning for a while after a run). The order is shuffled
    every round (seeded): in a fixed order a model always follows the same one, and that costs it
    more than one untimed call absorbs (an ONNX Runtime model timed right after another session
    ran 2-5% slower than the same model placed elsewhere in the round, here)."""
    timings = {name: [] for name in calls}
    order, shuffle = list(calls), random.Random(0).shuffle
    with torch.inference_mode():
        while min(len(values) for values in timings.values()) < runs:
            shuffle(order)
            for name in order:
                call = calls[name]
                call()
                for _ in range(block):
                    start = time.perf_counter()
                    call()
                    timings[name].append((time.perf_counter() - start) * 1000)
    return {name: float(np.median(values)) for name, values in timings.items()}


def onnx_bytes(path: Path) -> int:
    """An ONNX model's bytes on disk with the external-data files it reads (a peer's
    model.onnx.data, a lowbit folder's tensor file)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    files = {path} | {path.parent / entry.value for tensor in model.graph.initializer
                      for entry in tensor.external_data if entry.key == "location"}
    return sum(file.stat().st_size for file in files)


def print_table(title: str, rows: list[dict], columns: list[tuple[str, str]], width: int = 80) -> None:
    """`rows` as a table of `columns` ((key, header) pairs; those no row fills are left out), or,
    when that is wider than `width`, as one block per row: its leading text columns as a heading,
    then each measured value with its header, wrapped to `width`."""
    columns = [(key, header) for key, header in columns
               if any(row.get(key) not in (None, "") for row in rows)]
    table = Table(title=title)
    for _, header in columns:
        table.add_column(header, justify="right")
    for row in rows:
        table.add_row(*[_cell(row.get(key)) for key, _ in columns])
    console = Console(width=width)
    if Console(width=10 * width).measure(table).maximum <= width:  # its natural width
        console.print(table)
        return
    names = [key for key, _ in columns[:3] if all(isinstance(row.get(key, ""), str) for row in rows)]
    console.print(Text(title, style="bold"))
    for row in rows:
        console.print(Text(" · ".join(row[key] for key in names if row.get(key)), style="bold"))
        values = [f"{header} {_cell(row.get(key))}" for key, header in columns
                  if key not in names and row.get(key) not in (None, "")]
        for line in _packed(values, width - 4):
            console.print(Text("    " + line))


def _cell(value) -> str:
    return value if isinstance(value, str) else _format(value)


def _packed(items: list[str], width: int, gap: str = "   ") -> list[str]:
    """`items` in lines of at most `width` characters, none split (one longer stays whole)."""
    lines: list[str] = []
    for item in items:
        if lines and len(lines[-1]) + len(gap) + len(item) <= width:
            lines[-1] += gap + item
        else:
            lines.append(item)
    return lines


def _format(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path
