"""The `lowbit` command line: a thin face over the Python API (parse, call, print).

Exit codes: 0 success; 2 bad input or a refused operation (a lowbit error, message on stderr,
nothing written); 1 an unexpected internal error; 3 compare's verdict failed; 4 tune (or quantize
--max-drop) found no quantized model within the budget, or a scikit-learn file would not be
smaller than its original, so nothing was written.
"""

from __future__ import annotations

import json
import math
import os
import sys
import textwrap
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lowbit.data.batches import calibration_batches
from lowbit.errors import LowbitError, NotSmallerError
from lowbit.evaluate import estimate, folder_bytes
from lowbit.families import transformers as hf
from lowbit.families.api import load, save
from lowbit.families.lazy_weights import quantize_pretrained
from lowbit.families.registry import family_of
from lowbit.families.sources import load_source
from lowbit.families.written_while_quantizing import data_free
from lowbit.formats.atomic import write_text
from lowbit.formats.gguf_file import export_gguf
from lowbit.formats.lowbit_format import check_folder, read_manifest, verify_files
from lowbit.transform.distill import LOSSES
from lowbit.transform.prune import CRITERIA, PATTERNS
from lowbit.transform.quantize import quantize as quantize_model
from lowbit.transform.quantize import quantized_modules
from lowbit.transform.recipe import PRESETS, make_recipe
from lowbit.transform.scale_tuning import tune_scales

EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 1
EXIT_VERDICT_FAILED = 3
EXIT_BUDGET_MISSED = 4

app = typer.Typer(
    help="Quantize trained models to 16, 8 and 4 bits and measure what it costs and buys.\n\n"
    "Exit codes: 0 ok; 1 internal error; 2 bad input or refused (nothing written); "
    "3 compare: the quantized model is slower than the original or over the quality budget; "
    "4 tune / quantize --max-drop: nothing quantized met the budget, or a scikit-learn file would "
    "not be smaller (nothing written).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # click's plain help: wraps at any width, never cuts an option name
)


class _PipeConsole(Console):
    """A console that goes quiet when its reader leaves (`lowbit tune ... | head`) instead of
    exiting: the command still finishes its work (writes the model and the reports) and ends
    with its own exit code."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        _quiet_closed_stdout()


console = _PipeConsole()
errors = Console(stderr=True)


@contextmanager
def _user_errors() -> Iterator[None]:
    """Turn lowbit errors into a one-line message and exit code 2, anything else into exit 1."""
    try:
        yield
    except NotSmallerError as error:
        errors.print(f"[bold red]not smaller:[/] {escape(_printable(error))}", highlight=False,
                     soft_wrap=True)
        raise typer.Exit(EXIT_BUDGET_MISSED) from None
    except LowbitError as error:
        errors.print(f"[bold red]error:[/] {escape(_printable(error))}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    except (typer.Exit, typer.Abort):
        raise
    except BrokenPipeError:  # `lowbit inspect --json | head`: the reader left, which is no error
        _quiet_closed_stdout()
        raise typer.Exit(0) from None
    except KeyboardInterrupt:
        errors.print("interrupted; nothing was written")
        raise typer.Exit(130) from None
    except Exception as error:  # noqa: BLE001 - the last line of defence: no traceback for users
        errors.print(f"[bold red]internal error:[/] {type(error).__name__}: {escape(_printable(error))}\n"
                     "Please report this with the command you ran.", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_INTERNAL) from None


def _finite(value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number")
    return value


def _non_negative(value: float | None) -> float | None:
    if _finite(value) is not None and value < 0:
        raise typer.BadParameter(f"{value} is negative; give 0 or more")
    return value


def _positive(value: float | None) -> float | None:
    if _finite(value) is not None and value <= 0:
        raise typer.BadParameter(f"{value} is not above 0")
    return value


def _fraction(value: float) -> float:
    if not 0 <= _finite(value) <= 1:
        raise typer.BadParameter(f"{value} is not within [0, 1]")
    return value


def _bit_width(value: int) -> int:
    if value not in (8, 16, 32):
        raise typer.BadParameter(f"{value} is not one of 8, 16, 32")
    return value


def _one_of(*choices: str):
    """A callback that accepts only `choices`, or an unset option (this typer has no choice type for
    plain strings)."""
    def check(value: str | None) -> str | None:
        if value is not None and value not in choices:
            raise typer.BadParameter(f"{value!r} is not one of {', '.join(choices)}")
        return value
    return check


DistillationLoss = Annotated[str, typer.Option(
    "--loss", callback=_one_of("auto", *LOSSES),
    help="What the copy learns to match: auto (logits: kl; an encoder: embedding, its last layer's "
         "token states and sentence embedding); layers (an encoder's every layer: more guidance for a "
         "pruned one); mse.")]


def _one_of_blocks(value: int | None) -> int | None:
    """--activation-block: one of the block lengths MatMulNBits takes, or unset."""
    from lowbit.runtimes.onnxruntime import ACTIVATION_BLOCKS

    if value is not None and value not in ACTIVATION_BLOCKS:
        raise typer.BadParameter(f"{value} is not one of {', '.join(map(str, ACTIVATION_BLOCKS))}")
    return value


def _share_overrides(values: list[str] | None) -> list[tuple[str, float]] | None:
    """--override GLOB=SHARE, each parsed to (glob, share); the share's range is prune's to check."""
    if not values:
        return values
    parsed = []
    for value in values:
        glob, _, share = value.rpartition("=")
        try:
            number = float(share)
        except ValueError:
            number = None
        if not glob or number is None:
            raise typer.BadParameter(f"{value!r} is not GLOB=SHARE, e.g. 'embeddings*=0.6'")
        parsed.append((glob, number))
    return parsed


def _preset_list(value: str | None) -> str | None:
    if value is not None and not [name for name in value.split(",") if name.strip()]:
        raise typer.BadParameter("name at least one preset, e.g. w8a8-dynamic,w8")
    return value


BatchSizes = Annotated[list[int] | None, typer.Option(
    "--batch-size", min=1, help="Batch size to time (repeatable).")]
Threads = Annotated[int | None, typer.Option(min=1, help="torch threads (default: torch's).")]
TrustCode = Annotated[bool, typer.Option(
    help="Let a lowbit folder's manifest name a package.module:factory to import (importing runs "
    "its code; only for folders you trust).")]


def _trust_pickle(what: str):
    return Annotated[bool, typer.Option(
        help=f"scikit-learn: allow loading a .joblib/.pkl {what} (unpickling runs its code).")]


def _mib(size: int) -> str:
    return f"{size / 2**20:.2f} MiB"


@app.command()
def quantize(
    source: Annotated[str, typer.Argument(
        help="A transformers folder, package.module:factory, or a scikit-learn .joblib/.pkl/.skops file.")],
    out: Annotated[Path, typer.Option(
        "--out", "-o", help="Folder (a file for scikit-learn) to write; must not exist.")],
    recipe: Annotated[str, typer.Option("--recipe", "-r", help=f"Preset: {', '.join(PRESETS)}.")] = (
        "w8a8-dynamic"
    ),
    calibration: Annotated[Path | None, typer.Option(
        help="Calibration data (.txt/.jsonl text, or .safetensors inputs); needed by w8a8-static."
    )] = None,
    skip: Annotated[list[str] | None, typer.Option(
        help="Module-name glob to keep in float (repeatable), e.g. --skip 'pooler*'."
    )] = None,
    weights: Annotated[Path | None, typer.Option(
        help="safetensors weights for a package.module:factory source."
    )] = None,
    group_size: Annotated[int | None, typer.Option(min=1,
        help="Group size for int4 recipes (32, 64, 128, 256)."
    )] = None,
    fallback: Annotated[str | None, typer.Option(
        help="Preset for modules the recipe cannot quantize here (a group size that does not divide "
        "their width, a kernel this machine lacks), e.g. --fallback w8.")] = None,
    smoothing: Annotated[float | None, typer.Option(min=0.0, max=1.0,
        help="SmoothQuant's alpha (e.g. 0.5): move activation outliers into the weights of a "
        "Llama-style decoder before quantizing; needs --calibration.")] = None,
    tune_steps: Annotated[int | None, typer.Option(min=1,
        help="After quantizing, train the group scales and norms for N steps against the float model "
        "on --calibration, every integer kept, so the file and its GGUF export keep their size "
        "(lowbit.qat.tune_scales; weight-only recipes such as q4_0-awq-gptq).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
    max_drop: Annotated[float | None, typer.Option(callback=_non_negative,
        help="Quality budget: measure on --data and fall back (layer by layer, then to safer recipes) "
        "until the drop is at most this; exit 4 and write nothing if nothing quantized meets it."
    )] = None,
    data: Annotated[Path | None, typer.Option(
        help="Evaluation data for --max-drop; for scikit-learn, the reference inputs the fidelity guard "
        "checks (.jsonl/.txt/.csv/.npy).")] = None,
    metric: Annotated[str | None, typer.Option(help="Metric for --max-drop (default: by model).")] = None,
    relative: Annotated[bool, typer.Option(help="--max-drop is a fraction of the original's value.")] = False,
    trust_pickle: _trust_pickle("file") = False,
    bits: Annotated[int, typer.Option(
        callback=_bit_width, help="scikit-learn: starting width of every array (8, 16, 32).")] = 8,
    weight_threshold: Annotated[float, typer.Option(callback=_non_negative,
        help="scikit-learn: set coefficients smaller than this in magnitude to zero and store them "
        "sparsely, wherever no prediction on --data changes.")] = 0.0,
    probability_tolerance: Annotated[float, typer.Option(callback=_fraction,
        help="scikit-learn: largest allowed change of a predicted probability on --data.")] = 0.01,
    runtime: Annotated[str, typer.Option(callback=_one_of("torch", "onnxruntime", "auto"),
        help="What runs the saved model: auto (both timed here, the faster kept; lowbit.json says "
        "why), torch (PyTorch eager), or onnxruntime (the folder also holds model.onnx).")] = "auto",
    accuracy_level: Annotated[int, typer.Option(min=0, max=4,
        help="onnxruntime: 0 computes in float32 from lowbit's dequantized weights (equal to lowbit's "
        "reference); 4 quantizes activations to int8 per block (faster, slightly less exact).")] = 0,
    activation_block: Annotated[int | None, typer.Option(callback=_one_of_blocks,
        help="onnxruntime: longest MatMulNBits block (16, 32, 64, 128). At accuracy level 4 "
        "activations are quantized per block: smaller is more exact and slower. Default: the "
        "weights' group (int8: the longest block that divides the width).")] = None,
) -> None:
    """Quantize a model and save it as a lowbit folder (a scikit-learn model: one lowbit file).

    A scikit-learn model needs --data: every array is made as small as it can be with no
    prediction on --data changed (recipes do not apply).

    \b
    Examples:
      lowbit quantize ./minilm --recipe w8a8-dynamic --out ./minilm-w8a8
      lowbit quantize ./minilm --recipe w4 --max-drop 0.005 --data val.jsonl \\
          --out ./q
      lowbit quantize model.joblib --trust-pickle --data test.jsonl \\
          --out model.lowbit
    """
    with _user_errors():
        if out.exists() and not overwrite:
            raise LowbitError(f"{out} already exists; choose another --out or pass --overwrite")
        options = {key: value for key, value in locals().items() if key not in ("source", "out")}
        QUANTIZE_BY_FAMILY[family_of(source).name](source, out, **options)


def _quantize_torch(source, out, recipe, calibration, skip, weights, group_size, fallback, overwrite,
                    max_drop, data, metric, relative, runtime, accuracy_level, activation_block, smoothing,
                    tune_steps, **_) -> None:
    granularity = f"group:{group_size}" if group_size else None
    chosen = make_recipe(recipe, granularity=granularity, smoothing=smoothing)
    pretrained = hf.is_transformers_folder(source)
    tokenizer = hf.load_tokenizer(source) if pretrained else None
    batches = calibration_batches(calibration, tokenizer) if calibration else None
    if tune_steps and max_drop is not None:
        raise LowbitError("--tune-steps does not combine with --max-drop: tune the model quantize "
                          "writes, or let --max-drop search without it")
    if max_drop is not None:
        if data is None:
            raise LowbitError("--max-drop needs --data to measure the quality on")
        from lowbit.tune.search import safer_candidates

        candidates = [chosen, *safer_candidates(recipe)]
        _tune_and_save(load_source(source, weights), data, metric, max_drop, "size", candidates, batches,
                       relative, out, overwrite, tokenizer=tokenizer)
        return
    if tune_steps and not batches:
        raise LowbitError("--tune-steps needs --calibration: the text the float model teaches on")
    options = {"calibration": batches, "skip": skip, "fallback": fallback}
    if pretrained and runtime == "torch" and data_free(chosen) and not batches and not tune_steps:
        # written shard by shard as it is quantized: neither model is ever held whole
        folder = quantize_pretrained(source, chosen, out=out, overwrite=overwrite, **options)
        _print_written(folder, recipe)
        return
    if pretrained:  # each module's float weights read from the files as it is quantized
        quantized = quantize_pretrained(source, chosen, **options)
    else:  # in place: the model was loaded for this alone, each float module freed as it is replaced
        quantized = quantize_model(load_source(source, weights), chosen, inplace=True, **options)
    if tune_steps:  # the float model teaches: loaded again, as quantizing freed it
        teacher = hf.load_pretrained(source) if pretrained else load_source(source, weights)
        tuned = tune_scales(quantized, teacher, batches, steps=tune_steps)
        del teacher
        console.print(f"tuned the scales and norms: {tuned.steps} steps in {tuned.seconds:.0f} s, "
                      f"{tuned.loss} loss {tuned.curve[0][2]:.4g} -> {tuned.curve[-1][2]:.4g}")
    folder = save(quantized, out, overwrite=overwrite, runtime=runtime, accuracy_level=accuracy_level,
                  activation_block=activation_block)
    _print_written(folder, recipe)


def _print_written(folder: Path, recipe: str) -> None:
    """What `quantize` wrote, from the folder's manifest."""
    manifest = json.loads((folder / "lowbit.json").read_text())
    console.print(
        f"quantized {len(manifest['modules'])} modules with {recipe}; wrote {folder} "
        f"({_mib(folder_bytes(folder))}, source weights {_mib(manifest['source']['bytes'])})"
    )
    choice = manifest.get("runtime_choice") or {}
    reason = f" ({choice['reason']})" if choice.get("reason") else ""
    console.print(f"runtime: {manifest['runtime']}{reason}")


def _quantize_sklearn(source, out, bits, weight_threshold, data, trust_pickle, overwrite,
                      probability_tolerance, **_) -> None:
    from lowbit.families.sklearn import quantize_model_file

    report = quantize_model_file(source, out, bits, weight_threshold, data, trust_pickle, overwrite,
                                 probability_tolerance)
    table = Table(title=f"{source} → {out}", box=box.SIMPLE)
    for column in ("measure", "original", "lowbit"):
        table.add_column(column, justify="right")
    table.add_row("file size", _mib(report["original_size_bytes"]), _mib(report["quantized_size_bytes"]))
    table.add_row("load seconds", f"{report['original_load_seconds']:.3f}",
                  f"{report['quantized_load_seconds']:.3f}")
    if report["original_predictions_per_second"]:
        table.add_row("predictions/s", f"{report['original_predictions_per_second']:.0f}",
                      f"{report['quantized_predictions_per_second']:.0f}")
    console.print(table)
    console.print(f"{report['file_size_reduction_percent']:.1f}% smaller; "
                  + (f"{report['prediction_differences']} prediction differences on --data"
                     if report["verified"] else "fidelity NOT verified: pass --data to check predictions"))
    held_out = report.get("held_out")
    if held_out:
        low, high = held_out["ci95"]
        after = ("; the guard then climbed on every row, so the model written changes none of them"
                 if held_out.get("refit_on_all") else "")
        console.print(f"checked on {held_out['rows']:,} rows of --data the guard did not climb on: "
                      f"{held_out['changed']} changed (95% interval {low:.1%}–{high:.1%}); estimated "
                      f"share of new rows that would change: {held_out['estimated_flip_rate']:.1e}{after}")
    for path, steps in report["fallbacks"].items():
        console.print(_printable(f"  fell back: {path}: {' → '.join(steps)}"))
    for path in report["kept_float"]:
        console.print(_printable(f"  kept as is (unsupported): {path}"))
    for path, share in report["pruned"].items():
        console.print(_printable(f"  pruned: {path}: {share:.1%} of its entries are zero, stored sparsely"))


def _printable(text: object) -> str:
    """`text` as it can be printed: a lone surrogate (a file's name can hold one, from undecodable
    bytes) becomes its escape instead of failing the print."""
    return str(text).encode("utf-8", "backslashreplace").decode("utf-8")


def _table(title: str, headers: list[str], rows: list[tuple[str, ...]], whole: set[str]) -> Table:
    """A table that fits any width without losing a character: the columns in `whole` (numbers,
    short words) keep each value on one line at its full width; the others wrap, folding long
    names onto the next line instead of cutting them. Text from files is made printable."""
    rows = [tuple(escape(_printable(cell)) for cell in row) for row in rows]  # no markup from files
    table = Table(title=escape(_printable(title)))
    for index, header in enumerate(headers):
        widest = max([len(header), *(len(row[index]) for row in rows)])
        numeric = header in ("bytes", "stored bytes")
        table.add_column(header, justify="right" if numeric else "left", overflow="fold",
                         no_wrap=header in whole, min_width=widest if header in whole else None)
    for row in rows:
        table.add_row(*row)
    return table


def _widest_table(text: str) -> int:
    """The width a rendered Markdown table takes: each column as wide as its widest cell, plus
    the borders and padding between them; the widest of the text's tables."""
    widest, widths = 0, []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            cells = [len(cell.strip()) for cell in line.strip().strip("|").split("|")]
            widths += [0] * (len(cells) - len(widths))
            cells += [0] * (len(widths) - len(cells))
            widths = [max(width, cell) for width, cell in zip(widths, cells, strict=True)]
        elif widths:
            widest, widths = max(widest, sum(widths) + 3 * len(widths) + 1), []
    return widest


def _print_markdown(text: str) -> None:
    """A report, rendered on a terminal wide enough for its tables; otherwise (a pipe, a log, a
    narrow window) as the Markdown text itself, whose long lines wrap but are never cut, so no
    layer name or figure is lost."""
    from rich.markdown import Markdown

    text = _printable(text)
    if console.is_terminal and _widest_table(text) <= console.width:
        console.print(Markdown(text))
    else:
        console.print(text, markup=False, highlight=False, soft_wrap=True)


def _kernel_summary(kernels: dict[str, str]) -> str:
    """'fbgemm_dynamic', or 'fbgemm_dynamic ≤32 rows, dequantized_fp32 >32' when it varies by rows.

    Bucket keys are the most rows each serves; the last bucket also serves every larger input.
    """
    runs: list[list] = []  # [kernel, largest bucket it serves]
    for bucket, name in kernels.items():
        if runs and runs[-1][0] == name:
            runs[-1][1] = bucket
        else:
            runs.append([name, bucket])
    if len(runs) <= 1:
        return runs[0][0] if runs else "-"
    parts = [f"{name} ≤{bucket}" for name, bucket in runs[:-1]]
    return ", ".join(parts) + f", {runs[-1][0]} >{runs[-2][1]} rows"


@app.command()
def inspect(
    folder: Annotated[Path, typer.Argument(help="A lowbit model folder, or a scikit-learn lowbit file.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    verify: Annotated[bool, typer.Option(
        help="Also check every file against its sha256 (without it: the manifest, each file's size "
        "and each tensor file's header).")] = False,
) -> None:
    """Per-layer table of a saved model: scheme, bits, granularity, kernel, bytes, and totals.

    A scikit-learn file: per quantized array, its encoding, shape and stored bytes, and the
    fidelity report.

    \b
    Example:
      lowbit inspect ./minilm-w8a8 --verify
    """
    with _user_errors():
        INSPECT_BY_FAMILY[family_of(folder).name](folder, as_json, verify)


def _inspect_torch(folder: Path, as_json: bool, verify: bool) -> None:
    manifest = verify_files(folder) if verify else check_folder(folder)
    modules = manifest.get("modules", {})
    if as_json:
        print(json.dumps({"recipe": manifest.get("recipe"), "modules": modules,
                          "training": manifest.get("training"), "pruning": manifest.get("pruning"),
                          "sparse": manifest.get("sparse"), "folder_bytes": folder_bytes(folder)},
                         indent=2))
        return
    onnx_ops = (manifest.get("onnx") or {}).get("ops") if manifest.get("runtime") == "onnxruntime" else None
    rows = [(name, entry["type"].removeprefix("Q"), entry["spec"]["scheme"],
             f"{entry['spec']['weight']} {entry['spec']['granularity']}",
             onnx_ops.get(name, "?") if onnx_ops is not None else _kernel_summary(entry["spec"]["kernels"]),
             f"{entry['bytes']:,}")
            for name, entry in modules.items()]
    runs_on = "onnx op" if onnx_ops is not None else "kernel"
    table = _table(f"{folder} ({manifest['model'].get('class')})",
                   ["module", "layer", "scheme", "weight", runs_on, "bytes"], rows,
                   whole={"layer", "scheme", "bytes"})
    console.print(table)
    onnx_entry = manifest.get("onnx") or {}
    block = onnx_entry.get("activation_block")
    blocks = f", blocks of at most {block}" if block else ""
    runtime = {"eager": "PyTorch eager", "onnxruntime": "ONNX Runtime (model.onnx, accuracy level "
               f"{onnx_entry.get('accuracy_level', 0)}{blocks})"}.get(manifest.get("runtime"), "?")
    reason = (manifest.get("runtime_choice") or {}).get("reason")
    console.print(_printable(f"runtime: {runtime}" + (f"; chosen by auto: {reason}" if reason else "")))
    if manifest.get("runtime") == "onnxruntime" and onnx_entry.get("large_inputs_above") is not None:
        console.print(f"inputs of more than {onnx_entry['large_inputs_above']} tokens: int8 "
                      "DynamicQuantizeMatMul (measured faster)")
    quantized = sum(entry["bytes"] for entry in modules.values())
    console.print(f"{len(modules)} quantized modules, {_mib(quantized)} of quantized tensors; "
                  f"folder {_mib(folder_bytes(folder))}")
    training = manifest.get("training")
    if training and training.get("curve"):
        first, last = training["curve"][0][2], training["curve"][-1][2]
        console.print(f"trained after quantizing: {training.get('method')}, {training.get('steps')} steps in "
                      f"{training.get('seconds')} s, {training.get('loss')} loss {first:.4g} -> {last:.4g}")
    if manifest.get("pruning"):
        console.print(_pruning_line(manifest["pruning"], len(manifest.get("sparse") or {})))
    if verify:
        console.print("every file matches its recorded sha256")


def _inspect_sklearn(path: Path, as_json: bool, verify: bool) -> None:
    from lowbit.families.sklearn.lowbit_file import describe_file

    described = describe_file(path, verify)
    if as_json:
        print(json.dumps(described, indent=2))
        return
    rows = [(entry["path"], entry["encoding"], "×".join(map(str, entry["shape"])),
             f"{entry['stored_bytes']:,}") for entry in described["arrays"]]
    table = _table(f"{path} ({described['estimator']})", ["array", "encoding", "shape", "stored bytes"],
                   rows, whole={"encoding", "shape", "stored bytes"})
    console.print(table)
    report = described["report"]
    fidelity = (f"{report['prediction_differences']} prediction differences on the reference data"
                if report["verified"] else "fidelity NOT verified (quantized without reference data)")
    console.print(f"{len(described['arrays'])} quantized arrays, {len(report['fallbacks'])} fell back; "
                  f"{fidelity}; file {_mib(described['file_bytes'])}")
    console.print("every entry matches its recorded size and sha256"
                  + (", and the model rebuilds and reproduces its probe predictions" if verify else ""))


@app.command("estimate")
def estimate_command(
    source: Annotated[str, typer.Argument(help="A transformers folder, or package.module:factory.")],
    weights: Annotated[Path | None, typer.Option(help="safetensors weights for a factory.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Parameter count and estimated size at fp32/fp16/int8/int4 (estimates, not measurements).

    \b
    Example:
      lowbit estimate ./minilm
    """
    with _user_errors():
        result = estimate(load_source(source, weights))
        if as_json:
            print(json.dumps(result.to_dict(), indent=2))
            return
        console.print(f"{source}\n{result.parameters:,} parameters, "
                      f"{result.quantizable_parameters:,} in Linear/Conv2d/Embedding weights")
        table = Table(title="ESTIMATED sizes")
        table.add_column("precision")
        table.add_column("estimated size", justify="right")
        for precision, size in result.bytes.items():
            table.add_row(precision, _mib(size))
        console.print(table)
        console.print("[dim]estimates: bytes per weight × weights; measure with lowbit quantize[/]")


@app.command()
def demo(
    sentences: Annotated[int, typer.Option(min=1, help="Wikipedia sentences for the cosine.")] = 256,
    threads: Threads = None,
) -> None:
    """Quantize the bundled real all-MiniLM-L6-v2 (w8a8-dynamic, w4) and print measured results.

    \b
    Example:
      lowbit demo --threads 2
    """
    from lowbit.demo import run_demo

    with _user_errors():
        with console.status("starting") as status:
            rows = run_demo(sentences=sentences, threads=threads,
                            on_step=lambda message: status.update(message))
        fp32 = rows[0]
        table = Table(title=f"all-MiniLM-L6-v2, measured now ({fp32.latency_batch1.threads} threads)",
                      box=box.SIMPLE_HEAD)
        for column in ("model", "size on disk", "batch 1", "batch 8×128", "cosine"):
            table.add_column(column, justify="left" if column == "model" else "right", no_wrap=True)
        for row in rows:
            table.add_row(
                row.name,
                f"{_mib(row.size_bytes)} ÷{fp32.size_bytes / row.size_bytes:.2f}",
                f"{row.latency_batch1.p50:.1f} ms {_speedup(fp32.latency_batch1, row.latency_batch1)}",
                f"{row.latency_batch8.p50:.0f} ms {_speedup(fp32.latency_batch8, row.latency_batch8)}",
                f"{row.cosine:.4f}",
            )
        console.print(table)
        for row in rows[1:]:
            kernels = ", ".join(f"{count} × {kernel}" for kernel, count in row.kernels.items())
            identical = "identical" if row.reload_identical else "[red]DIFFERENT[/]"
            console.print(f"{row.name}: reloaded outputs {identical}; kernels at batch 1: {kernels}")
        console.print(
            f"[dim]Latency: p50 of interleaved runs, ×N = fp32 p50 / model p50 (red: slower). "
            f"Cosine: mean over {sentences} Wikipedia sentences embedded one at a time. "
            "Size: fp32 model.safetensors vs the whole saved lowbit folder.[/]"
        )


def _speedup(baseline, candidate) -> str:
    ratio = baseline.p50 / candidate.p50
    return f"×{ratio:.2f}" if ratio >= 1 else f"[red]×{ratio:.2f}[/]"


@app.command("compare")
def compare_command(
    original: Annotated[str, typer.Argument(help="Original: transformers folder, lowbit folder or factory.")],
    quantized: Annotated[str, typer.Argument(help="Quantized: lowbit folder (or any of the above).")],
    data: Annotated[Path, typer.Option(help="Evaluation data: .jsonl, .txt, .csv, .npy, .pt, .safetensors.")],
    metric: Annotated[str | None, typer.Option(
        help="Headline metric: accuracy, f1, perplexity, cosine, agreement, sqnr (default: by model)."
    )] = None,
    batch_size: BatchSizes = None,
    max_drop: Annotated[float | None, typer.Option(
        callback=_non_negative,
        help="Quality budget: largest allowed drop (default: 1% of the original's value).")] = None,
    relative: Annotated[bool, typer.Option(help="--max-drop is a fraction of the original's value.")] = False,
    samples: Annotated[int, typer.Option(min=1, help="Samples of the data to use.")] = 256,
    seq_len: Annotated[int, typer.Option(min=1, help="Tokens per sample (context for perplexity).")] = 128,
    runs: Annotated[int, typer.Option(min=1, help="Timed runs per batch size.")] = 20,
    threads: Threads = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the JSON report here.")] = None,
    html_out: Annotated[Path | None, typer.Option("--html", help="Write the HTML report here.")] = None,
    memory: Annotated[bool, typer.Option(help="Measure load time and peak RSS in subprocesses.")] = True,
    trust_pickle: _trust_pickle("original") = False,
    trust_code: TrustCode = False,
    fallback: Annotated[bool, typer.Option(
        help="When the quantized model cannot serve (it fails to load, needs a kernel this machine "
             "lacks, or fails one batch), measure the original in its place, with the reason.")] = False,
) -> None:
    """Measure a quantized model against its original on your data: quality, speed, size, memory.

    Exit code 3 when the quantized model is slower than the original at a batch size, or its
    quality drops more than --max-drop (default: 1% of the original's value).

    \b
    Examples:
      lowbit compare ./minilm ./minilm-w8a8 --data test.jsonl --html report.html
      lowbit compare model.joblib model.lowbit --data test.jsonl --trust-pickle
    """

    from lowbit.families.api import compare as run_compare

    with _user_errors():
        comparison = run_compare(original, quantized, data, metric=metric,
                                 batch_sizes=tuple(batch_size or (1, 8)), max_drop=max_drop,
                                 relative=relative, samples=samples, seq_len=seq_len, runs=runs,
                                 threads=threads, memory=memory, trust_pickle=trust_pickle,
                                 trust_code=trust_code, fallback=fallback)
        _print_markdown(comparison.to_markdown())
        if json_out:
            write_text(json_out, comparison.to_json())
        if html_out:
            write_text(html_out, comparison.to_html())
    if not comparison.verdict()["passed"]:
        raise typer.Exit(EXIT_VERDICT_FAILED)


@app.command("bench")
def bench_command(
    model: Annotated[str, typer.Argument(
        help="A lowbit folder, transformers folder, factory, or scikit-learn model file.")],
    batch_size: BatchSizes = None,
    seq_len: Annotated[int, typer.Option(min=1, help="Tokens per sample for text models.")] = 128,
    threads: Threads = None,
    samples: Annotated[int, typer.Option(min=1, help="Timed runs per batch size.")] = 20,
    data: Annotated[Path | None, typer.Option(help="Inputs (required for tensor models).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    trust_pickle: _trust_pickle("file") = False,
    trust_code: TrustCode = False,
    fallback: Annotated[str | None, typer.Option(
        help="The original (folder, factory or model file): measured instead when the model cannot "
             "serve (it fails to load, needs a kernel this machine lacks, or fails one batch).")] = None,
) -> None:
    """Latency (p50/p95/p99), throughput, size, peak memory and load time of one model.

    A scikit-learn model times predict on the first samples of --data.

    \b
    Examples:
      lowbit bench ./minilm-w8a8 --batch-size 1 --batch-size 8 --threads 2
      lowbit bench model.lowbit --data test.jsonl
    """
    from lowbit.families.api import bench as run_bench

    with _user_errors():
        report = run_bench(model, tuple(batch_size or (1, 8)), seq_len, samples, threads, data,
                           trust_pickle=trust_pickle, trust_code=trust_code, fallback=fallback)
        if as_json:
            print(json.dumps(report, indent=2, default=str))
            return
        sklearn = report["kind"].startswith("scikit-learn")
        title = report["kind"] if sklearn else f"{report['threads']} threads, {seq_len} tokens per sample"
        measured = f"{fallback}, the original, in place of {model}" if report.get("served") else model
        table = Table(title=f"{measured} ({title})")
        for column in ("batch", "p50 ms", "p95 ms", "p99 ms", "samples/s"):
            table.add_column(column, justify="right")
        for batch, entry in report["latency_ms"].items():
            table.add_row(batch, f"{entry['p50']:.2f}", f"{entry['p95']:.2f}", f"{entry['p99']:.2f}",
                          f"{entry['throughput']:.1f}")
        console.print(table)
        if sklearn:
            console.print(f"size on disk {_mib(report['size_bytes'] or 0)}, "
                          f"load {report.get('load_seconds') or 0:.3f} s (median)")
            return
        console.print(f"size on disk {_mib(report['size_bytes'] or 0)}, parameters in memory "
                      f"{_mib(report['param_bytes'])}, peak RSS {_mib(report.get('peak_rss_bytes') or 0)}, "
                      f"load {report.get('load_seconds') or 0:.2f} s")
        if "generation" in report:
            generation = report["generation"]
            console.print(f"prefill {generation['prefill_tokens_per_second']:.1f} tokens/s, "
                          f"decode {generation['decode_tokens_per_second']:.1f} tokens/s")


def _tune_and_save(model, data, metric, max_drop, objective, candidates, calibration, relative, out,
                   overwrite, tokenizer=None, time_budget=None, batch_size=1, samples=256,
                   json_out=None, html_out=None, workers=1, ray_address=None, distill_fallback=True) -> None:
    """Run tune, print its report, write the reports; save the model only if the budget held."""

    from lowbit.tune.search import tune

    result = tune(model, data, metric=metric, max_drop=max_drop, objective=objective, candidates=candidates,
                  calibration=calibration, time_budget=time_budget, relative=relative,
                  batch_size=batch_size, samples=samples, tokenizer=tokenizer, workers=workers,
                  ray_address=ray_address, distill_fallback=distill_fallback)
    _print_markdown(result.to_markdown())
    if json_out:
        write_text(json_out, json.dumps(result.to_dict(), indent=2))
    if html_out:
        write_text(html_out, result.to_html())
    if not result.met_budget:
        errors.print(f"[bold red]budget not met:[/] {result.message} Nothing was written to {out}.",
                     highlight=False)
        raise typer.Exit(EXIT_BUDGET_MISSED)
    folder = save(result.model, out, overwrite=overwrite, runtime=result.runtime,
                  accuracy_level=result.accuracy_level)
    console.print(f"wrote {folder} ({_mib(folder_bytes(folder))})")


@app.command("tune")
def tune_command(
    source: Annotated[str, typer.Argument(help="A transformers folder, or package.module:factory.")],
    data: Annotated[Path, typer.Option(help="Evaluation data: .jsonl, .txt, .csv, .npy, .pt, .safetensors.")],
    max_drop: Annotated[float, typer.Option(callback=_non_negative,
        help="Largest allowed quality drop: absolute (0.01 = one point of accuracy) or with --relative "
        "a fraction of the original's value.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write (must not exist).")],
    metric: Annotated[str | None, typer.Option(
        help="accuracy, f1, perplexity, cosine, agreement, sqnr (default: by model).")] = None,
    relative: Annotated[bool, typer.Option(help="--max-drop is a fraction of the original's value.")] = False,
    objective: Annotated[str, typer.Option(
        help="size: the smallest model within budget; latency: the fastest at --batch-size.")] = "size",
    candidates: Annotated[str | None, typer.Option(callback=_preset_list,
        help="Comma-separated presets from aggressive to safe (default: w4,w8a8-static,w8a8-dynamic,w8,fp16)."
    )] = None,
    calibration: Annotated[Path | None, typer.Option(
        help="Calibration data for static candidates (default: the first 32 samples of --data).")] = None,
    time_budget: Annotated[float | None, typer.Option(callback=_positive,
        help="Seconds after which no new trial starts.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Batch size for quality and latency.")] = 1,
    samples: Annotated[int, typer.Option(min=1, help="Samples of the data to use.")] = 256,
    weights: Annotated[Path | None, typer.Option(help="safetensors weights for a factory source.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the JSON report here.")] = None,
    html_out: Annotated[Path | None, typer.Option("--html", help="Write the HTML report here.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
    workers: Annotated[int, typer.Option(min=1,
        help="Trials measured at once, in local processes (the choice is the serial search's).")] = 1,
    ray: Annotated[str | None, typer.Option(
        help="Measure the trials as Ray tasks on the cluster at this address (host:port, or "
        "'local').")] = None,
    distill: Annotated[bool, typer.Option(
        help="When no candidate meets the budget, distil the closest one in the time left "
        "(needs --time-budget; trains on half of --data, judged on the other half).")] = True,
) -> None:
    """Find the smallest (or fastest) quantized model within a quality budget, and save it.

    Tries candidates from aggressive to safe, moves the most sensitive modules to a safer scheme
    when one misses, and keeps the best that meets the budget. Exit code 4, and nothing written,
    when no quantized model meets it. --time-budget bounds the wall time: w8 runs first, and
    the message names every candidate not tried; when nothing meets the budget, the closest
    candidate is distilled in the time left. --workers and --ray measure trials in parallel;
    latency is timed in this process while every worker is idle.

    \b
    Examples:
      lowbit tune ./minilm --data val.jsonl --metric cosine --max-drop 0.01 \\
          --out ./q
      lowbit tune ./minilm --data val.jsonl --max-drop 0.01 --out ./q \\
          --ray 10.0.0.5:6379
    """
    with _user_errors():
        if out.exists() and not overwrite:
            raise LowbitError(f"{out} already exists; choose another --out or pass --overwrite")
        model = load_source(source, weights)
        tokenizer = hf.load_tokenizer(source) if hf.is_transformers_folder(source) else None
        batches = calibration_batches(calibration, tokenizer) if calibration else None
        names = [name.strip() for name in candidates.split(",") if name.strip()] if candidates else None
        _tune_and_save(model, data, metric, max_drop, objective, names, batches, relative, out, overwrite,
                       tokenizer=tokenizer, time_budget=time_budget, batch_size=batch_size, samples=samples,
                       json_out=json_out, html_out=html_out, workers=workers, ray_address=ray,
                       distill_fallback=distill)




@app.command("batch")
def batch_command(
    source: Annotated[Path, typer.Argument(
        help="A folder of models: transformers folders, scikit-learn model files, and factories "
        "named in its lowbit-batch.json.")],
    out: Annotated[Path, typer.Option(
        "--out", "-o", help="Folder for the quantized models (outside SOURCE).")],
    recipe: Annotated[str, typer.Option("--recipe", "-r", help="Preset for torch models.")] = "w8a8-dynamic",
    bits: Annotated[int, typer.Option(
        callback=_bit_width, help="scikit-learn: starting width of every array (8, 16, 32).")] = 8,
    max_drop: Annotated[float | None, typer.Option(callback=_non_negative,
        help="Quality budget for models with data: torch models fall back to safer recipes until "
        "the drop is at most this.")] = None,
    data_map: Annotated[Path | None, typer.Option(
        help='JSON {"model name": "data file"}: each model\'s evaluation data (paths relative to it).'
    )] = None,
    workers: Annotated[int, typer.Option(min=1, help="Models quantized at once, in local processes.")] = 1,
    ray: Annotated[str | None, typer.Option(
        help="Run each model as a Ray task on the cluster at this address (host:port, or 'local').")] = None,
    trust_pickle: _trust_pickle("file") = False,
    retry_failed: Annotated[bool, typer.Option(help="Run again the models an earlier run failed.")] = False,
) -> None:
    """Quantize every model in a folder (and compare each on its data) in one command.

    No failure stops the rest: each shows in the summary with its reason. Each output is written
    atomically and recorded, so a rerun skips finished models and an interrupted batch resumes.
    Writes OUT/batch.json. Exit code 3 when a model failed or failed its verdict.

    \b
    Examples:
      lowbit batch ./models --out ./quantized --data-map data.json --trust-pickle
      lowbit batch ./models --out ./quantized --workers 2
      lowbit batch ./models --out ./quantized --ray 10.0.0.5:6379
    """
    from lowbit.families.batch import run_batch

    def report(row) -> None:
        said = f"{row.verdict}" if row.status == "done" else f"failed: {row.reason}"
        errors.print(_printable(f"lowbit batch: {row.name}: {said} ({row.seconds:.0f} s)"), soft_wrap=True)

    with _user_errors():
        result = run_batch(source, out, recipe, bits, max_drop, data_map, workers, ray, trust_pickle,
                           retry_failed, on_done=report)
        table = Table(title=f"lowbit batch: {len(result.rows)} models ({result.executor})", box=box.SIMPLE)
        for column in ("model", "verdict", "MiB", "metric", "drop", "× b1", "s"):
            table.add_column(column, justify="left" if column in ("model", "verdict", "metric") else "right")
        for row in result.rows:
            table.add_row(*_batch_cells(row))
        console.print(table)
        if any(row.skipped for row in result.rows):
            console.print("  * finished by an earlier run (--retry-failed runs failed ones again)")
        for note in result.notes:
            console.print(textwrap.fill(f"note: {note}", 80, subsequent_indent="  "))
        for row in result.failed:  # wrapped at 80 columns; a path stays whole on its line
            reason = textwrap.fill(f"{row.name}: {row.reason or row.verdict}", 80, initial_indent="  ",
                                   subsequent_indent="    ", break_long_words=False, break_on_hyphens=False)
            console.print(_printable(reason), soft_wrap=True)
        console.print(f"summary: {out / 'batch.json'}", soft_wrap=True)
    if result.failed:
        raise typer.Exit(EXIT_VERDICT_FAILED)


def _batch_cells(row) -> tuple[str, ...]:
    """One summary line: verdict (* when an earlier run made it), sizes, quality drop (relative
    for torch models, predictions changed for scikit-learn), speed-up at batch 1, seconds."""
    size = (f"{(row.original_bytes or 0) / 2**20:.1f}→{row.quantized_bytes / 2**20:.1f}"
            if row.quantized_bytes else "")
    verdict = (row.verdict if row.status == "done" else "[red]failed[/]") + ("*" if row.skipped else "")
    drop = "" if row.drop is None else f"{row.relative_drop:.2%}" if row.relative_drop is not None \
        else f"{row.drop:g}"
    return (escape(row.name), verdict, size, row.metric, drop, f"{row.speedup:.2f}" if row.speedup else "",
            f"{row.seconds:.0f}")


@app.command()
def export(
    folder: Annotated[Path, typer.Argument(help="A lowbit model folder (a transformers model).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The file to write; must not exist.")],
    file_format: Annotated[str, typer.Option("--format", callback=_one_of("onnx", "gguf"),
        help="What to write: onnx (ONNX Runtime), or gguf (llama.cpp, Ollama, LM Studio; a Llama "
        "model quantized with a q8_0, q5_0, q4_0 or q4_1 recipe: RTN, -gptq or -awq-gptq).")] = "onnx",
    accuracy_level: Annotated[int, typer.Option(min=0, max=4,
        help="0: float32 compute from lowbit's dequantized weights; 4: int8 activations per block.")] = 0,
    activation_block: Annotated[int | None, typer.Option(callback=_one_of_blocks,
        help="Longest MatMulNBits block (16, 32, 64, 128): at accuracy level 4, activations are "
        "quantized per block, so smaller is more exact and slower.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
) -> None:
    """Write a lowbit folder's model as one file another runtime runs with lowbit's own integers,
    scales and zero points: ONNX for plain ONNX Runtime (MatMulNBits, DynamicQuantizeMatMul,
    GatherBlockQuantized), or GGUF for llama.cpp (Q8_0, Q5_0 and Q4_0 blocks, exactly lowbit's
    weights; --accuracy-level and --activation-block are ONNX's only).

    \b
    Examples:
      lowbit export ./minilm-w8 --format onnx --out minilm-w8.onnx
      lowbit quantize ./smollm2 --recipe q4_0-gptq --calibration wiki.txt \\
          --out ./smollm2-q4
      lowbit export ./smollm2-q4 --format gguf --out smollm2-q4_0.gguf
    """
    with _user_errors():
        from lowbit.formats.atomic import atomic_file
        from lowbit.runtimes.onnxruntime import export as onnx_export

        model = load(folder, runtime="torch")
        if file_format == "gguf":
            with hf.verified_tokenizer_files(folder) as tokenizer_folder:  # checked against lowbit.json
                tensors = export_gguf(model, tokenizer_folder or folder, out, overwrite, name=folder.name)
            kinds = ", ".join(sorted({tensor.kind for tensor in tensors}))
            console.print(f"wrote {out} ({_mib(out.stat().st_size)}, gguf, {len(tensors)} tensors: {kinds})")
            return
        graph = onnx_export(model, accuracy_level=accuracy_level, activation_block=activation_block)
        with atomic_file(out, overwrite) as staging:
            staging.write_bytes(graph)
        console.print(f"wrote {out} ({_mib(len(graph))}, {file_format}, accuracy level {accuracy_level})")


@app.command()
def qat(
    source: Annotated[str, typer.Argument(help="A transformers folder, or package.module:factory.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write; must not exist.")],
    data: Annotated[Path, typer.Option(
        help="Training inputs, no labels needed: .txt/.jsonl text, or .safetensors inputs.")],
    recipe: Annotated[str, typer.Option("--recipe", "-r", help=f"Preset: {', '.join(PRESETS)}.")] = "w4",
    steps: Annotated[int | None, typer.Option(min=1, help="Optimizer steps to train for.")] = None,
    time_budget: Annotated[float | None, typer.Option(callback=_positive,
        help="Seconds to train for (with --steps: whichever ends first).")] = None,
    calibration: Annotated[Path | None, typer.Option(
        help="Calibration data for the static scheme's activation grids (w8a8-static) and for "
             "GPTQ's rounding, which training starts from (-gptq recipes).")] = None,
    learn_scales: Annotated[bool, typer.Option(
        help="Train each weight scale too (LSQ), instead of taking it from the weight's range.")] = False,
    learn_ranges: Annotated[bool, typer.Option(
        help="Train the static scheme's activation ranges too, from their calibrated values.")] = False,
    lr: Annotated[float, typer.Option(callback=_positive,
        help="Adam's learning rate at the start; it decays linearly to zero over the budget.")] = 5e-5,
    loss: DistillationLoss = "auto",
    batch_size: Annotated[int, typer.Option(min=1, help="Texts or inputs per training step.")] = 16,
    skip: Annotated[list[str] | None, typer.Option(
        help="Module-name glob to keep in float (repeatable), e.g. --skip 'pooler*'.")] = None,
    weights: Annotated[Path | None, typer.Option(
        help="safetensors weights for a package.module:factory source.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
    runtime: Annotated[str, typer.Option(callback=_one_of("torch", "onnxruntime", "auto"),
        help="What runs the saved model: auto, torch or onnxruntime (as for quantize).")] = "auto",
) -> None:
    """Quantization-aware training: the float model teaches its quantized copy on --data (no
    labels: it matches the float model's outputs), then the copy is saved as a lowbit folder,
    as quantize saves one. Give a budget: --steps, --time-budget, or both.

    \b
    Examples:
      lowbit qat ./minilm --recipe w4 --data sentences.txt --time-budget 720 \\
          --out ./minilm-w4-qat
      lowbit qat ./minilm --recipe w8a8-static --calibration calib.jsonl \\
          --data train.jsonl --steps 300 --out ./minilm-w8a8-qat
    """
    with _user_errors():
        from lowbit.data.batches import as_dataset, training_inputs
        from lowbit.transform import distill as distillation
        from lowbit.transform import qat as training

        if out.exists() and not overwrite:
            raise LowbitError(f"{out} already exists; choose another --out or pass --overwrite")
        if steps is None and time_budget is None:
            raise LowbitError("give a training budget: --steps N, --time-budget SECONDS, or both")
        teacher = load_source(source, weights).eval()
        tokenizer = hf.load_tokenizer(source) if hf.is_transformers_folder(source) else None
        dataset = as_dataset(data)
        inputs = training_inputs(dataset, batch_size)
        batches = calibration_batches(calibration, tokenizer) if calibration else None
        prepared = training.prepare(teacher, make_recipe(recipe), calibration=batches,
                                    learn_scales=learn_scales, learn_ranges=learn_ranges, skip=skip)
        result = distillation.distill(prepared, teacher, inputs, steps=steps, time_budget=time_budget,
                                      tokenizer=tokenizer, lr=lr, batch_size=batch_size, loss=loss)
        quantized = training.convert(prepared)
        folder = save(quantized, out, overwrite=overwrite, runtime=runtime)
        _print_training(result)
        console.print(f"wrote {folder} ({_mib(folder_bytes(folder))}, {recipe}, "
                      f"{len(quantized_modules(quantized))} quantized modules)")


@app.command()
def prune(
    source: Annotated[str, typer.Argument(help="A transformers folder, or package.module:factory.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write; must not exist.")],
    sparsity: Annotated[float, typer.Option(
        help="Share of each weight row set to zero, in [0, 1); 2:4 is always 0.5.")] = 0.5,
    pattern: Annotated[str, typer.Option(callback=_one_of(*PATTERNS),
        help="unstructured (any values of a row) or 2:4 (two of every four inputs).")] = "unstructured",
    override: Annotated[list[str] | None, typer.Option(callback=_share_overrides,
        help="GLOB=SHARE: another sparsity for the modules the glob matches (repeatable), e.g. "
             "--override 'embeddings*=0.6' with --sparsity 0.39: half of MiniLM's weights, the "
             "embedding tables (which lose little to it) pruned hardest.")] = None,
    criterion: Annotated[str | None, typer.Option(callback=_one_of(*CRITERIA),
        help="What goes: magnitude; wanda (|W| x ||X|| on calibration inputs); sparsegpt (as wanda's "
             "data, and the kept weights updated to make up for the pruned ones: least lost, slower; "
             "transformer blocks only). Default: wanda with calibration inputs, else magnitude.")] = None,
    recipe: Annotated[str, typer.Option("--recipe", "-r",
        help="Preset to quantize with after pruning; symmetric int8 (w8) keeps the zeros.")] = "w8",
    calibration: Annotated[Path | None, typer.Option(
        help="Inputs that score the weights (Wanda: |W| x ||X||) and calibrate a static recipe; "
             "default: the first 256 of --data; without either, weights are scored by magnitude.")] = None,
    data: Annotated[Path | None, typer.Option(
        help="Distillation inputs, no labels needed: .txt/.jsonl text, or .safetensors inputs.")] = None,
    steps: Annotated[int | None, typer.Option(min=1, help="Distillation steps after pruning.")] = None,
    time_budget: Annotated[float | None, typer.Option(callback=_positive,
        help="Seconds of distillation after pruning (with --steps: whichever ends first).")] = None,
    lr: Annotated[float, typer.Option(callback=_positive,
        help="Adam's learning rate at the start of distillation; it decays linearly to zero.")] = 1e-4,
    loss: DistillationLoss = "auto",
    batch_size: Annotated[int, typer.Option(min=1, help="Texts or inputs per distillation step.")] = 16,
    skip: Annotated[list[str] | None, typer.Option(
        help="Module-name glob to leave dense and in float (repeatable), e.g. --skip 'pooler*'.")] = None,
    weights: Annotated[Path | None, typer.Option(
        help="safetensors weights for a package.module:factory source.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
) -> None:
    """Prune, quantize and save a model whose pruned weights are stored as a bitmask and their
    kept values: a smaller file. This CPU has no sparse kernel, so it is not faster. With --data
    and a budget (--steps, --time-budget), the float model first teaches the pruned, quantized
    copy what pruning lost (as qat does).

    \b
    Examples:
      lowbit prune ./minilm --sparsity 0.5 --calibration calib.txt \\
          --out ./minilm-sparse
      lowbit prune ./minilm --data sentences.txt --time-budget 900 \\
          --out ./minilm-sparse-kd
    """
    with _user_errors():
        from lowbit.data.batches import as_dataset, training_inputs
        from lowbit.transform import distill as distillation
        from lowbit.transform import prune as pruning
        from lowbit.transform import qat as training

        if out.exists() and not overwrite:
            raise LowbitError(f"{out} already exists; choose another --out or pass --overwrite")
        if (steps is not None or time_budget is not None) and data is None:
            raise LowbitError("distillation needs --data (inputs the float model teaches on)")
        if data is not None and steps is None and time_budget is None:
            raise LowbitError("give --data a budget: --steps N, --time-budget SECONDS, or both")
        teacher = load_source(source, weights).eval()
        tokenizer = hf.load_tokenizer(source) if hf.is_transformers_folder(source) else None
        scoring = calibration or data
        batches = calibration_batches(scoring, tokenizer)[:32] if scoring else None
        pruned = pruning.prune(teacher, sparsity, pattern, calibration=batches, skip=skip,
                               criterion=criterion, overrides=dict(override or []))
        result = None
        if data is None:
            quantized = quantize_model(pruned, make_recipe(recipe), calibration=batches, skip=skip)
        else:
            inputs = training_inputs(as_dataset(data), batch_size)
            prepared = training.prepare(pruned, make_recipe(recipe), calibration=batches, skip=skip)
            result = distillation.distill(prepared, teacher, inputs, steps=steps, time_budget=time_budget,
                                          tokenizer=tokenizer, lr=lr, batch_size=batch_size, loss=loss)
            quantized = training.convert(prepared)
        folder = save(quantized, out, overwrite=overwrite, runtime="torch")
        if result is not None:
            _print_training(result)
        console.print(_pruning_line(pruned.lowbit_pruning, len(read_manifest(folder)["sparse"])))
        console.print(f"wrote {folder} ({_mib(folder_bytes(folder))}, {recipe}, "
                      f"{len(quantized_modules(quantized))} quantized modules)")


def _pruning_line(record: dict, stored_sparse: int) -> str:
    others = "".join(f", {glob} {share:.0%}" for glob, share in (record.get("overrides") or {}).items())
    return (f"pruned: {len(record['modules'])} modules, {record['pattern']} {record['sparsity']:.0%}{others} "
            f"by {record['criterion']}; {stored_sparse} tensors stored as bitmask + kept values (no sparse "
            "kernel here: smaller, not faster)")


def _print_training(result) -> None:
    """Steps, time and the loss curve at ten points (all of it is in lowbit.json)."""
    points = result.curve[:: max(1, len(result.curve) // 10)]
    if result.curve and points[-1] != result.curve[-1]:
        points.append(result.curve[-1])
    rows = [(str(step), f"{seconds:.0f}", f"{loss:.4g}") for step, seconds, loss in points]
    console.print(f"distillation ({result.loss} loss): {result.steps} steps in {result.seconds:.0f} s")
    console.print(_table("loss curve", ["step", "seconds", "loss"], rows, whole={"step"}))


@app.command()
def recipes() -> None:
    """List the named recipe presets."""
    rows = [(name, make_recipe(name).model_dump_json(exclude={"skip", "overrides"})) for name in PRESETS]
    table = _table("presets", ["name", "recipe"], rows, whole={"name"})
    console.print(table)


# What `quantize` and `inspect` do with a source, by the family that claims it (lowbit.families).
QUANTIZE_BY_FAMILY = {"scikit-learn": _quantize_sklearn, "torch": _quantize_torch}
INSPECT_BY_FAMILY = {"scikit-learn": _inspect_sklearn, "torch": _inspect_torch}


def _one_line_warning(message, category, *_args, **_kwargs) -> str:
    """Warnings as `warning: ...` lines (not Python's file:line and source echo)."""
    return f"warning: {message}\n"


def main() -> None:
    warnings.formatwarning = _one_line_warning
    try:
        app()
    except BrokenPipeError:  # the reader left while lowbit printed outside a command's handler
        _quiet_closed_stdout()
        raise SystemExit(0) from None


def _quiet_closed_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not complain."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


if __name__ == "__main__":
    main()
