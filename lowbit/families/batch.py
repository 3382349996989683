"""`lowbit batch`: every model in a folder quantized (and, given data, compared) in one command.

A source folder holds any mix of:
- transformers folders (a sub-folder with config.json), quantized with the torch recipe;
- scikit-learn model files (.joblib, .pkl, .pickle: read only with `trust_pickle`; .skops),
  quantized from `bits` as `lowbit quantize` does;
- `package.module:factory` models named in `lowbit-batch.json`:
  `{"models": {"efficientnet": {"factory": "pkg.mod:fn", "weights": "w.safetensors",
  "data": "photos.safetensors"}}}` (weights and data optional, paths relative to the folder).

`data_map` (a JSON file `{"model name": "data file"}`, paths relative to it) gives each model
its evaluation data; a model with data is compared against its original (quality on that data,
latency at batch 1) and gets a verdict, one without is quantized and said to be unchecked.

Each model is one task on the executor (lowbit.tune.executors: here, local processes or Ray);
no failure stops the rest. Each output is written atomically, then a record of it under
`OUT/.lowbit-batch/`, so a rerun skips what is finished (a failure too, unless
`retry_failed`) and an interrupted batch resumes. With Ray on several machines, OUT must be on
storage every node sees.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lowbit.errors import LowbitError, NotSmallerError
from lowbit.formats.atomic import write_text
from lowbit.tune.executors import Outcome, executor_spec, node_name, run_all

MANIFEST = "lowbit-batch.json"
STATE = ".lowbit-batch"
RESULT = "batch.json"
SKLEARN_SUFFIXES = (".joblib", ".pkl", ".pickle", ".skops")
DEFAULT_RECIPE = "w8a8-dynamic"


@dataclass(frozen=True)
class BatchModel:
    """One model of the batch: where it comes from and where its quantized copy goes."""

    name: str
    family: str  # "torch" or "scikit-learn"
    source: str  # a folder, a model file, or package.module:factory
    output: str
    weights: str | None = None
    data: str | None = None


@dataclass(frozen=True)
class BatchSettings:
    recipe: str = DEFAULT_RECIPE
    bits: int = 8
    max_drop: float | None = None
    trust_pickle: bool = False
    runs: int = 10  # timed runs per model in its comparison
    samples: int = 128  # evaluation samples per model


@dataclass
class BatchRow:
    """One model's line of the summary."""

    name: str
    family: str
    status: str  # "done" or "failed"
    verdict: str  # "pass", "fail", "refused" (nothing written), "unchecked (no data)"; "" when it failed
    reason: str = ""
    recipe: str = ""
    original_bytes: int | None = None
    quantized_bytes: int | None = None
    metric: str = ""
    drop: float | None = None  # in the metric's units (scikit-learn: predictions changed)
    relative_drop: float | None = None  # a fraction of the original's value (torch models)
    speedup: float | None = None
    seconds: float = 0.0
    node: str = ""
    skipped: bool = False  # finished by an earlier run
    settings: str = ""  # what made it (recipe, bits, budget, data): a rerun with others redoes it


@dataclass
class BatchResult:
    rows: list[BatchRow]
    out: str
    executor: str
    notes: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[BatchRow]:
        return [row for row in self.rows if row.status == "failed" or row.verdict == "fail"]

    def to_dict(self) -> dict[str, Any]:
        return {"out": self.out, "executor": self.executor, "notes": self.notes,
                "models": [asdict(row) for row in self.rows]}


def discover(source: str | os.PathLike, out: str | os.PathLike, data_map: str | os.PathLike | None = None
             ) -> list[BatchModel]:
    """Every model in `source` with its output path in `out`; refuses an `out` inside `source`,
    and two models that would share an output or a name."""
    source, out = Path(source).resolve(), Path(out).resolve()
    if not source.is_dir():
        raise LowbitError(f"{source} is not a folder of models")
    if out == source or source in out.parents:
        raise LowbitError(f"the output folder {out} is inside the source folder {source}; choose one outside "
                          "it, or the next batch would take the outputs for models")
    data = _read_data_map(Path(data_map)) if data_map else {}
    models = [*_folder_models(source, out), *_manifest_models(source, out)]
    _check_unique(models)
    unknown = sorted(set(data) - {model.name for model in models})
    if unknown:
        raise LowbitError(f"the data map names models the folder does not hold: {', '.join(unknown)}")
    return [BatchModel(**{**asdict(model), "data": data.get(model.name, model.data)}) for model in models]


def _folder_models(source: Path, out: Path) -> list[BatchModel]:
    models = []
    for path in sorted(source.iterdir()):
        if path.is_dir() and (path / "config.json").is_file() and not (path / "lowbit.json").exists():
            models.append(BatchModel(path.name, "torch", str(path), str(out / path.name)))
        elif path.is_file() and path.suffix.lower() in SKLEARN_SUFFIXES:
            models.append(BatchModel(path.stem, "scikit-learn", str(path), str(out / f"{path.stem}.lowbit")))
    return models


def _manifest_models(source: Path, out: Path) -> list[BatchModel]:
    path = source / MANIFEST
    if not path.is_file():
        return []
    try:
        entries = json.loads(path.read_text())["models"]
        return [BatchModel(name, "torch", entry["factory"], str(out / name),
                           _beside(source, entry.get("weights")), _beside(source, entry.get("data")))
                for name, entry in entries.items()]
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise LowbitError(f"{path}: expected {{\"models\": {{name: {{\"factory\": \"pkg.mod:fn\", ...}}}}}} "
                          f"({type(error).__name__}: {error})") from None


def _read_data_map(path: Path) -> dict[str, str]:
    try:
        mapping = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise LowbitError(f"cannot read the data map {path}: {error}") from None
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
        raise LowbitError(f"{path}: the data map is a JSON object of model name -> data file")
    return {name: _beside(path.parent, file) for name, file in mapping.items()}


def _beside(folder: Path, file: str | None) -> str | None:
    return None if file is None else str(folder / file)


def _check_unique(models: list[BatchModel]) -> None:
    """Two models may share neither an output nor a name (their record and data-map key)."""
    outputs: dict[str, str] = {}
    names: dict[str, str] = {}
    for model in models:
        if model.output in outputs:
            raise LowbitError(f"{outputs[model.output]} and {model.source} would both write {model.output}; "
                              "rename one of them")
        if model.name in names:
            raise LowbitError(f"{names[model.name]} and {model.source} are both named {model.name!r} in the "
                              "batch; rename one of them")
        outputs[model.output], names[model.name] = model.source, model.source


def run_batch(source: str | os.PathLike, out: str | os.PathLike, recipe: str = DEFAULT_RECIPE, bits: int = 8,
              max_drop: float | None = None, data_map: str | os.PathLike | None = None, workers: int = 1,
              ray_address: str | None = None, trust_pickle: bool = False, retry_failed: bool = False,
              on_done: Callable[[BatchRow], None] | None = None, executor: str | None = None) -> BatchResult:
    """Quantize every model in `source` into `out` (see the module docstring); returns one row per
    model, finished ones from earlier runs included, and writes `out/batch.json`. `workers`,
    `ray_address` and `executor` pick where the models run (lowbit.tune.executors.executor_spec)."""
    models = discover(source, out, data_map)
    settings = BatchSettings(recipe, bits, max_drop, trust_pickle)
    spec = executor_spec(workers, ray_address, executor)
    state = Path(out) / STATE
    state.mkdir(parents=True, exist_ok=True)
    finished = {model.name: row for model in models
                if (row := _finished(state, model, settings, retry_failed)) is not None}
    todo = [model for model in models if model.name not in finished]

    def done(index: int, outcome: Outcome) -> None:
        row = _row(todo[index], outcome)
        row.settings = _fingerprint(todo[index], settings)
        _record(state, row)
        if on_done:
            on_done(row)

    if todo:  # a rerun with everything finished starts no workers
        run_all(quantize_entry, [(model, settings) for model in todo], spec, on_done=done)
    rows = [finished.get(model.name) or _read_record(state, model.name) for model in models]
    result = BatchResult(rows, str(out), spec.name if not spec.parallel else f"{spec.name} ({spec.workers})")
    if spec.parallel and todo:
        result.notes.append(f"speed-ups were timed in the workers while up to {spec.workers} models ran at "
                            "once (on Ray, one thread each); run with one worker for speed measured alone")
    write_text(Path(out) / RESULT, json.dumps(result.to_dict(), indent=2))
    return result


def _finished(state: Path, model: BatchModel, settings: BatchSettings, retry_failed: bool) -> BatchRow | None:
    """The record of a model an earlier run finished with these settings (its output, if it
    wrote one, still there), or None."""
    row = _read_record(state, model.name, missing_ok=True)
    if row is None or row.settings != _fingerprint(model, settings):
        return None
    if row.status == "failed" and retry_failed:
        return None
    if row.status == "done" and row.verdict != "refused" and not Path(model.output).exists():
        return None
    row.skipped = True
    return row


def _fingerprint(model: BatchModel, settings: BatchSettings) -> str:
    return json.dumps({"source": model.source, "weights": model.weights, "data": model.data,
                       **asdict(settings)}, sort_keys=True)


def _read_record(state: Path, name: str, missing_ok: bool = False) -> BatchRow | None:
    path = state / f"{name}.json"
    if missing_ok and not path.is_file():
        return None
    try:
        return BatchRow(**{**json.loads(path.read_text()), "skipped": False})
    except (OSError, ValueError, TypeError):
        if missing_ok:
            return None  # a damaged record: the model runs again
        raise


def _record(state: Path, row: BatchRow) -> None:
    write_text(state / f"{row.name}.json", json.dumps(asdict(row), indent=2))


def _row(model: BatchModel, outcome: Outcome) -> BatchRow:
    if outcome.ok:
        row = outcome.value
    else:
        row = BatchRow(model.name, model.family, "failed", "", reason=outcome.error or "")
    row.seconds, row.node = outcome.seconds, outcome.node
    return row


def quantize_entry(job: tuple[BatchModel, BatchSettings]) -> BatchRow:
    """One model, quantized, saved and (with data) compared: a pure task for any executor. Its
    own errors become a failed row; only a dead worker escapes it."""
    model, settings = job
    try:
        quantize = _quantize_sklearn if model.family == "scikit-learn" else _quantize_torch
        return quantize(model, settings)
    except NotSmallerError as error:  # lowbit's own refusal: a verdict, not a failure
        return BatchRow(model.name, model.family, "done", "refused", reason=str(error), node=node_name())
    except Exception as error:  # noqa: BLE001 - one model's failure is its row, and the batch goes on
        return BatchRow(model.name, model.family, "failed", "", reason=f"{type(error).__name__}: {error}",
                        node=node_name())


def _quantize_torch(model: BatchModel, settings: BatchSettings) -> BatchRow:
    import lowbit
    from lowbit.evaluate import folder_bytes
    from lowbit.evaluate.comparison import quality_drop
    from lowbit.families.sources import load_source
    from lowbit.tune.search import safer_candidates

    original = load_source(model.source, model.weights)
    recipe = settings.recipe
    if settings.max_drop is not None and model.data:
        tuned = lowbit.tune(original, model.data, max_drop=settings.max_drop, samples=settings.samples,
                            candidates=[recipe, *safer_candidates(recipe)], final_comparison=False,
                            progress=False)
        if not tuned.met_budget:
            return BatchRow(model.name, "torch", "done", "refused", reason=tuned.message, recipe=recipe)
        quantized, recipe = tuned.model, tuned.chosen.label
    else:
        quantized = lowbit.quantize(original, recipe, progress=False)
    lowbit.save(quantized, model.output, overwrite=True)  # atomic; a run cut short before its record
    row = BatchRow(model.name, "torch", "done", "unchecked (no data)", recipe=recipe,
                   original_bytes=quantized.lowbit_source["bytes"],
                   quantized_bytes=folder_bytes(model.output))
    if model.data:
        factory = not Path(model.source).exists()  # the folder names the factory the batch's manifest named
        comparison = lowbit.compare(original, model.output, model.data, batch_sizes=(1,),
                                    max_drop=settings.max_drop, samples=settings.samples, runs=settings.runs,
                                    memory=False, progress=False, trust_code=factory)
        verdict = comparison.verdict()
        row.verdict = "pass" if verdict["passed"] else "fail"
        row.metric, row.speedup = comparison.metric, comparison.speedups.get("1")
        entry = comparison.quality[comparison.metric]
        row.drop, row.relative_drop = quality_drop(entry), quality_drop(entry, relative=True)
        if not verdict["passed"]:
            row.reason = "; ".join(verdict["lines"])
    return row


def _quantize_sklearn(model: BatchModel, settings: BatchSettings) -> BatchRow:
    from lowbit.families.sklearn import quantize_model_file

    report = quantize_model_file(model.source, model.output, settings.bits, data=model.data,
                                 trust_pickle=settings.trust_pickle, overwrite=True)
    verified = report["verified"]
    unchanged = verified and report.get("prediction_differences") == 0
    return BatchRow(model.name, "scikit-learn", "done",
                    ("pass" if unchanged else "fail") if verified else "unchecked (no data)",
                    recipe=f"{settings.bits}-bit arrays", original_bytes=report["original_size_bytes"],
                    quantized_bytes=report["quantized_size_bytes"],
                    metric="changed" if verified else "",
                    drop=float(report["prediction_differences"]) if verified else None)
