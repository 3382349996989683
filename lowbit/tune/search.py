"""`lowbit.tune`: the smallest or fastest quantized model within an accuracy budget.

How it decides:
1. Candidates go from aggressive to safe (w4 → w8a8-static → w8a8-dynamic → w8 → fp16). Each is
   quantized (static ones from one shared calibration pass, the calibrator picked per tensor) and
   scored on the user's data against the original's outputs; all of them first, as they are, so
   that a safe answer exists before the costlier search.
2. A candidate that missed the budget then gets layer fallback: modules are ranked by sensitivity
   (output SQNR of the model with only that module quantized, on a few batches; the exact metric
   for the top suspects), and the most sensitive 1, 2, 4, ... move to the next safer candidate
   until the budget holds.
3. Among the trials that meet the budget, the smallest (objective "size") or the fastest at the
   user's batch size (objective "latency", and never one slower than the original) wins. For
   latency each accepted trial runs in PyTorch eager and, where it exports, in ONNX Runtime,
   whose metric is measured again before it counts (lowbit.tune.runtimes). The search stops
   early once no later candidate can beat the winner on the objective.
4. When nothing quantized meets the budget, the original model is returned, with the closest
   trial's numbers; `strict=True` raises AccuracyBudgetError instead.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from lowbit.algorithms import ALGORITHMS
from lowbit.data.batches import as_dataset, call_model, task_batches
from lowbit.errors import AccuracyBudgetError, LowbitError, LowbitWarning
from lowbit.evaluate.compare_models import Settings, compare_models, infer_kind
from lowbit.evaluate.comparison import RENDERERS, Comparison, finite_json, quality_drop
from lowbit.evaluate.latency import measure_latencies
from lowbit.evaluate.metrics import speedup_interval, sqnr_db
from lowbit.evaluate.size import parameter_bytes
from lowbit.evaluate.tasks import Task, collect_outputs, primary_tensor, score_quality
from lowbit.progress import progress_bar
from lowbit.transform.calibrate import CalibrationResult, calibrate
from lowbit.transform.quantize import build_module, plan, quantize, set_module
from lowbit.transform.recipe import PRESETS, Recipe, make_recipe
from lowbit.tune.executors import ExecutorSpec, executor_spec, node_name
from lowbit.tune.runtimes import onnx_variants, runtime_fields

Objective = Literal["size", "latency"]
DEFAULT_CANDIDATES = ("w4", "w8a8-static", "w8a8-dynamic", "w8", "fp16")
BUDGET_TOLERANCE = 1e-9  # 0.7575 - 0.7525 is 0.00500000000000000444 in floating point
WEIGHT_BITS = {"int4": 4, "int5": 5, "int8": 8, "fp16": 16, "bf16": 16}


@dataclass
class Trial:
    """One measured candidate: its recipe, quality, size, speed, and whether it was accepted."""

    label: str
    recipe: dict[str, Any]
    quality: float
    drop: float
    size_bytes: int
    accepted: bool
    reason: str
    fallback_modules: list[str] = field(default_factory=list)
    latency_ms: float | None = None
    speedup: float | None = None
    speedup_ci95: list[float] | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    candidate: str = ""  # the candidate's name (the label adds the modules moved)
    node: str = ""  # the host and process (and Ray node) that measured it
    runtime: str = "eager"  # what ran it fastest within budget (objective latency; lowbit.tune.runtimes)
    accuracy_level: int | None = None  # ONNX Runtime's MatMulNBits accuracy level, when it runs there


@dataclass
class TuneResult:
    """What `tune` chose and why: the model, its recipe, its Comparison, and every trial."""

    model: nn.Module
    recipe: Recipe | None
    comparison: Comparison | None
    trials: list[Trial]
    sensitivity: list[dict[str, Any]]
    met_budget: bool
    objective: str
    metric: str
    max_drop: float
    relative: bool
    original_quality: float
    original_size_bytes: int
    message: str
    settings: dict[str, Any] = field(default_factory=dict)
    runtime_model: nn.Module | None = None  # the chosen model in ONNX Runtime, when it ran faster there

    @property
    def runtime(self) -> str:
        """The runtime to save the chosen model with: "onnxruntime" when it ran faster there."""
        chosen = self.chosen
        return chosen.runtime if chosen is not None else "eager"

    @property
    def accuracy_level(self) -> int:
        """ONNX Runtime's MatMulNBits accuracy level for the chosen model (0 in PyTorch)."""
        chosen = self.chosen
        return (chosen.accuracy_level or 0) if chosen is not None else 0

    @property
    def chosen(self) -> Trial | None:
        return next((trial for trial in self.trials if trial.reason == "chosen"), None)

    def closest(self) -> Trial | None:
        """The trial with the smallest quality drop (what to look at when nothing passed)."""
        return min(self.trials, key=lambda trial: trial.drop, default=None)

    def to_dict(self) -> dict[str, Any]:
        return finite_json({
            "met_budget": self.met_budget, "message": self.message, "objective": self.objective,
            "metric": self.metric, "max_drop": self.max_drop, "relative": self.relative,
            "original": {"quality": self.original_quality, "size_bytes": self.original_size_bytes},
            "recipe": self.recipe.model_dump(mode="json") if self.recipe else None,
            "runtime": self.runtime, "accuracy_level": self.accuracy_level,
            "trials": [asdict(trial) for trial in self.trials],
            "sensitivity": self.sensitivity, "settings": self.settings,
            "comparison": self.comparison.to_dict() if self.comparison else None,
        })

    def to_markdown(self) -> str:
        return RENDERERS.get(("tune", "markdown"))(self)

    def to_html(self) -> str:
        return RENDERERS.get(("tune", "html"))(self)


@dataclass
class _Workload:
    """Everything a trial is measured against: data batches and the original's outputs."""

    model: nn.Module
    task: Task
    metric: str
    batches: list[Any]
    reference: torch.Tensor
    proxy_batches: list[Any]
    proxy_reference: torch.Tensor
    speed_batch: Any
    max_drop: float
    relative: bool
    rounding_batches: list[Any]  # what a block-by-block algorithm (GPTQ) rounds against


PROXY_TOKENS = 128


def _proxy(batches: list[Any], kind: str) -> list[Any]:
    """The sensitivity proxy's batches: a language model's windows cut to their first 128 tokens
    (the proxy ranks modules; it need not score every token)."""
    if kind != "causal_lm":
        return batches
    return [{k: v[:, :PROXY_TOKENS] for k, v in batch.items()} for batch in batches]


def _model_inputs(batch: Any) -> Any:
    """A batch without its labels (language-model windows carry them for scoring)."""
    return {k: v for k, v in batch.items() if k != "labels"} if isinstance(batch, dict) else batch


def _primary_outputs(model: nn.Module, batches: Iterable[Any]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([primary_tensor(call_model(model, _model_inputs(batch))).float().reshape(-1)
                          for batch in batches])


def _score(work: _Workload, model: nn.Module) -> tuple[float, float]:
    """(quantized metric value, drop against the original: positive is worse)."""
    outputs = collect_outputs(model, work.batches, work.task)
    entry = score_quality(work.task, work.reference, outputs, [work.metric], resamples=0)[work.metric]
    return entry["quantized"], quality_drop(entry, work.relative) + 0.0  # + 0.0: no "-0" in reports


def _original_quality(work: _Workload) -> float:
    entry = score_quality(work.task, work.reference, work.reference, [work.metric], resamples=0)
    return entry[work.metric]["original"]


def _latency(work: _Workload, model: nn.Module, runs: int) -> dict[str, Any]:
    """Candidate p50 at the user's batch size, timed interleaved with the original."""
    calls = {"original": lambda: call_model(work.model, work.speed_batch),
             "candidate": lambda: call_model(model, work.speed_batch)}
    stats = measure_latencies(calls, runs=runs)
    low, high = speedup_interval(stats["original"].timings_ms, stats["candidate"].timings_ms)
    return {"latency_ms": stats["candidate"].p50, "speedup": stats["original"].p50 / stats["candidate"].p50,
            "speedup_ci95": [low, high]}


def _one_module_at_a_time(model: nn.Module, recipe: Recipe, calibration: CalibrationResult | None,
                          fallback: Recipe | None, names: Iterable[str] | None = None):
    """Yield (name, spec, model) with only module `name` quantized, on one working copy of `model`
    (the module is put back after each step)."""
    work = copy.deepcopy(model).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LowbitWarning)  # the trials record these
        specs, _ = plan(work, recipe, fallback)
    static = [name for name, spec in specs.items() if spec.scheme == "static"]
    ranges = calibration.ranges(recipe.calibrator, static) if static and calibration else {}
    for name in specs if names is None else names:
        original = work.get_submodule(name)
        set_module(work, name, build_module(original, specs[name], ranges.get(name), recipe.algorithm))
        try:
            yield name, specs[name], work
        finally:
            set_module(work, name, original)


def sensitivity(
    model: nn.Module, recipe: Recipe, proxy_batches: list[Any], calibration: CalibrationResult | None = None,
    reference: torch.Tensor | None = None, fallback: Recipe | None = None,
) -> list[dict[str, Any]]:
    """Each quantizable module's effect alone: the model's output SQNR (dB) with only that module
    quantized by `recipe`, most sensitive (lowest SQNR) first. `model` itself is not changed."""
    reference = _primary_outputs(model, proxy_batches) if reference is None else reference
    rows = [{"name": name, "sqnr_db": sqnr_db(reference, _primary_outputs(work, proxy_batches)),
             "weight": spec.weight, "scheme": spec.scheme}
            for name, spec, work in _one_module_at_a_time(model, recipe, calibration, fallback)]
    return sorted(rows, key=lambda row: row["sqnr_db"])


def _rank_with_exact_metric(work: _Workload, recipe: Recipe, rows: list[dict[str, Any]],
                            calibration: CalibrationResult | None, fallback: Recipe | None,
                            top: int) -> list[dict[str, Any]]:
    """Re-rank the `top` proxy suspects by the exact metric drop with only that module quantized."""
    by_name = {row["name"]: row for row in rows[:top]}
    for name, _, model in _one_module_at_a_time(work.model, recipe, calibration, fallback, list(by_name)):
        by_name[name]["drop_alone"] = _score(work, model)[1]
    head = sorted(rows[:top], key=lambda row: -row["drop_alone"])
    return head + rows[top:]


def measure_trial(work: _Workload, calibration: CalibrationResult | None, name: str, recipe: Recipe,
                  moved: list[str], safer: tuple[str, Recipe] | None) -> tuple[Trial, nn.Module | None]:
    """A candidate quantized (modules `moved` to the safer recipe, or kept float without one) and
    scored against the original: a Trial with its quality, size and seconds, accepted when within
    the budget (latency and the final judgement come later), and the model; pure work that any
    executor can run. A candidate that cannot be quantized gives a Trial that says why, no model."""
    start = time.monotonic()
    label = _label(name, moved, safer and safer[0])
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", LowbitWarning)
            model = quantize_trial(work, calibration, recipe, moved, safer)
    except LowbitError as error:
        return Trial(label, recipe.model_dump(mode="json"), math.nan, math.inf, 0, False,
                     f"could not quantize: {error}", moved, seconds=time.monotonic() - start, candidate=name,
                     node=node_name()), None
    quality, drop = _score(work, model)
    trial = Trial(label, recipe.model_dump(mode="json"), quality, drop, parameter_bytes(model),
                  drop <= work.max_drop + BUDGET_TOLERANCE, "", moved,
                  notes=sorted({str(warning.message) for warning in caught}), candidate=name,
                  node=node_name())
    trial.seconds = time.monotonic() - start
    return trial, model


def quantize_trial(work: _Workload, calibration: CalibrationResult | None, recipe: Recipe, moved: list[str],
                   safer: tuple[str, Recipe] | None) -> nn.Module:
    """The trial's model: `recipe`, with modules `moved` to the safer recipe (kept float without one)."""
    overrides = {module: safer[1] for module in moved} if safer else {}
    if ALGORITHMS.get(recipe.algorithm).needs_hessian:  # GPTQ rounds on inputs, not ranges
        calibration = work.rounding_batches
    return quantize(work.model, recipe, calibration=calibration, overrides=overrides,
                    skip=moved if safer is None else [], fallback=safer[1] if safer else None, progress=False)


def rank_modules(work: _Workload, calibration: CalibrationResult | None, recipe: Recipe,
                 safer: tuple[str, Recipe], exact_top: int) -> list[dict[str, Any]]:
    """Modules by sensitivity to `recipe` (proxy SQNR), the top `exact_top` re-ranked by the
    exact metric: pure work that any executor can run."""
    ranked = sensitivity(work.model, recipe, work.proxy_batches, calibration, work.proxy_reference,
                         fallback=safer[1])
    return _rank_with_exact_metric(work, recipe, ranked, calibration, safer[1], exact_top)


def _label(recipe_name: str, moved: list[str], safer: str | None) -> str:
    if not moved:
        return recipe_name
    return f"{recipe_name}, {len(moved)} most sensitive → {safer or 'float'}"


def _bits(recipe: Recipe) -> int:
    return WEIGHT_BITS[recipe.weights]


class _BudgetSearch:
    """The trial loop: candidates in order, layer fallback on a miss, early stop, time budget.

    With a time budget the search keeps its word on wall time: a cheap safe candidate (w8 when
    it is among the candidates) runs first, whatever the budget, so an answer exists early and
    running out of time never leaves nothing; each later trial starts
    only when the slowest trial so far, plus as much again for the final comparison, still fits
    in what is left; and every candidate not tried is named with the reason.
    """

    def __init__(self, work: _Workload, candidates: list[tuple[str, Recipe]], objective: Objective,
                 calibration: CalibrationResult | None, deadline: float, runs: int,
                 exact_top: int, bar: Any) -> None:
        self.work, self.candidates, self.objective = work, candidates, objective
        self.calibration, self.runs, self.exact_top, self.bar = calibration, runs, exact_top, bar
        self.deadline = deadline
        self.trials: list[Trial] = []
        self.best: tuple[Trial, nn.Module] | None = None
        self.sensitivity: list[dict[str, Any]] = []
        self.not_tried: dict[str, str] = {}
        self.runtime_models: dict[str, nn.Module] = {}  # trial label -> its model in ONNX Runtime

    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline

    def trial_cost(self) -> float:
        """The slowest trial so far: what the next one is expected to take."""
        return max((trial.seconds for trial in self.trials), default=0.0)

    def fits(self, trials: float = 1.0) -> bool:
        """Whether `trials` more trials and the final comparison fit in the time left."""
        if math.isinf(self.deadline):
            return True
        left = self.deadline - time.monotonic()
        return left > 0 and left >= self.trial_cost() * (trials + 1)

    def _early(self) -> int | None:
        """The index of the cheap safe candidate to run first under a time budget: w8 (int8
        weights, no calibration), else the last int8 candidate, else none."""
        if math.isinf(self.deadline):
            return None
        names = [name for name, _ in self.candidates]
        if "w8" in names:
            return names.index("w8")
        int8 = [i for i, (_, recipe) in enumerate(self.candidates) if recipe.weights == "int8"]
        return int8[-1] if int8 else None

    def _skip_reason(self, recipe: Recipe, trials: float = 1.0) -> str | None:
        if self._cannot_improve(recipe):
            return "cannot be smaller than the chosen model (as many weight bits)"
        if not self.fits(trials):
            return "the time budget would run out first"
        return None

    def run(self) -> None:
        """Every candidate as it is first, so that an answer exists early; then layer fallback for
        the ones that missed the budget, aggressive first, while it can still beat the winner."""
        step = self.bar.add_task("tuning", total=2 * len(self.candidates))
        early = self._early()
        rest = [index for index in range(len(self.candidates)) if index != early]
        order = ([early] if early is not None else []) + rest
        missed = []
        for index in order:
            name, recipe = self.candidates[index]
            self.bar.advance(step)
            reason = None if index == early else self._skip_reason(recipe)  # an answer, always
            if reason:
                self.not_tried[name] = reason
                continue
            self.bar.update(step, description=f"trying {name}")
            safer = self.candidates[index + 1] if index + 1 < len(self.candidates) else None
            if self._try(name, recipe, [], safer).reason.startswith("over budget") and safer is not None:
                missed.append((index, name, recipe, safer))
        for _, name, recipe, safer in sorted(missed, key=lambda item: item[0]):
            self.bar.advance(step)
            reason = self._skip_reason(recipe, trials=2.0)  # a sensitivity pass, then a trial
            if reason:
                self.not_tried[f"{name} with layer fallback to {safer[0]}"] = reason
                continue
            self._fall_back(name, recipe, safer, step)

    def _cannot_improve(self, recipe: Recipe) -> bool:
        """For size: a candidate (even mixed with safer modules) with at least the winner's weight
        bits cannot be smaller."""
        if self.best is None or self.objective != "size":
            return False
        return _bits(recipe) >= _bits(make_recipe(self.best[0].recipe))

    def _try(self, name: str, recipe: Recipe, moved: list[str], safer: tuple[str, Recipe] | None) -> Trial:
        trial, model = self._measure(name, recipe, moved, safer)  # its seconds: the measuring
        return self.consider(trial, model, self._timing)

    def consider(self, trial: Trial, model: nn.Module | None,
                 timing: Callable[[Trial, nn.Module | None], dict[str, Any]]) -> Trial:
        """Judge a measured trial (timed first with `timing` when the objective is latency and it
        is within budget), record it, and keep it if it is the best so far."""
        start = time.monotonic()
        if trial.reason:  # could not quantize
            self.trials.append(trial)
            return trial
        if trial.accepted and self.objective == "latency":
            for key, value in timing(trial, model).items():
                setattr(trial, key, value)
        trial.reason = self._judge(trial)
        trial.accepted = trial.reason in ("accepted", "chosen")
        trial.seconds += time.monotonic() - start
        self.trials.append(trial)
        if trial.accepted and self._better(trial):
            if self.best is not None:
                self.best[0].reason = "accepted"
            trial.reason = "chosen"
            self.best = (trial, model)
        return trial

    def _measure(self, name: str, recipe: Recipe, moved: list[str], safer: tuple[str, Recipe] | None
                 ) -> tuple[Trial, nn.Module | None]:
        """The trial's quality and size, and its model (a parallel search measures elsewhere)."""
        return measure_trial(self.work, self.calibration, name, recipe, moved, safer)

    def _timing(self, trial: Trial, model: nn.Module | None) -> dict[str, Any]:
        """Latency fields of an accepted trial, timed here against the original in each runtime
        that can run it (lowbit.tune.runtimes): the fastest whose metric, measured again in it,
        stays within the budget; its quality and drop then replace PyTorch's."""
        best = runtime_fields(None, _latency(self.work, model, self.runs))
        notes = list(trial.notes)
        for level, in_onnxruntime in onnx_variants(model):
            timing = _latency(self.work, in_onnxruntime, self.runs)
            if timing["speedup"] <= best["speedup"]:
                continue
            quality, drop = _score(self.work, in_onnxruntime)
            where = f"ONNX Runtime (accuracy level {level})"
            if drop > self.work.max_drop + BUDGET_TOLERANCE:
                notes.append(f"{where} ran {timing['speedup']:.2f}× but dropped {drop:.4g}: over budget")
                continue
            best = runtime_fields(level, {**timing, "quality": quality, "drop": drop})
            self.runtime_models[trial.label] = in_onnxruntime
        return {**best, "notes": notes}

    def _ranking(self, name: str, recipe: Recipe, safer: tuple[str, Recipe]) -> list[dict[str, Any]]:
        """Modules most sensitive to `recipe` first, the top few re-ranked by the exact metric."""
        return rank_modules(self.work, self.calibration, recipe, safer, self.exact_top)

    def _judge(self, trial: Trial) -> str:
        if not trial.accepted:
            return f"over budget: drop {trial.drop:.4g} > {self.work.max_drop:g}"
        if self.objective == "latency" and (trial.speedup is None or trial.speedup <= 1.0):
            return f"within budget but not faster than the original ({trial.speedup:.2f}×)"
        return "accepted"

    def _better(self, trial: Trial) -> bool:
        if self.best is None:
            return True
        best = self.best[0]
        if self.objective == "size":
            return (trial.size_bytes, trial.drop) < (best.size_bytes, best.drop)
        return trial.speedup > best.speedup

    def _fall_back(self, name: str, recipe: Recipe, safer: tuple[str, Recipe], step) -> None:
        self.bar.update(step, description=f"sensitivity of {name}")
        ranked = self._ranking(name, recipe, safer)
        self.sensitivity.append({"candidate": name, "modules": ranked})
        count = 1
        while count <= len(ranked) // 2 and self.fits():
            self.bar.update(step, description=f"{name}: {count} most sensitive → {safer[0]}")
            if self._try(name, recipe, [row["name"] for row in ranked[:count]], safer).accepted:
                return
            count *= 2


def safer_candidates(recipe: str) -> list[str]:
    """The default candidates safer than `recipe` (for quantize --max-drop's fallback chain)."""
    order = list(DEFAULT_CANDIDATES)
    start = order.index(recipe) + 1 if recipe in order else 1 if recipe.startswith("w4") else len(order) - 1
    return order[start:]


def _auto_calibrated(recipe: Recipe) -> Recipe:
    """A static preset takes, per tensor, the calibrator with the least expected error (all are
    scored from the one shared histogram pass) rather than one global choice."""
    return make_recipe(recipe, calibrator="auto") if recipe.scheme == "static" else recipe


def _candidates(candidates: Sequence[str | Recipe] | None) -> list[tuple[str, Recipe]]:
    chosen = candidates or DEFAULT_CANDIDATES
    named = [(item, _auto_calibrated(make_recipe(item))) if isinstance(item, str)
             else (f"candidate {i + 1}", make_recipe(item)) for i, item in enumerate(chosen)]
    if not named:
        raise LowbitError("give at least one candidate recipe")
    return named


def _rounding_batches(calibration: Any, fallback_batches: list[Any]) -> list[Any]:
    """The batches a GPTQ candidate rounds against: the calibration given, or, when there is none
    (or only a CalibrationResult, which holds ranges and no inputs), the data's first batches."""
    if calibration is None or isinstance(calibration, CalibrationResult):
        return [_model_inputs(batch) for batch in fallback_batches]
    return list(calibration)


def _calibration(model: nn.Module, candidates: list[tuple[str, Recipe]], calibration: Any,
                 fallback_batches: list[Any], progress: bool) -> CalibrationResult | None:
    if not any(recipe.scheme == "static" for _, recipe in candidates):
        return None
    if isinstance(calibration, CalibrationResult):
        return calibration
    return calibrate(model, calibration if calibration is not None else fallback_batches, progress=progress)


def tune(
    model: nn.Module,
    data: Any,
    metric: str | None = None,
    max_drop: float = 0.01,
    objective: Objective = "size",
    candidates: Sequence[str | Recipe] | None = None,
    calibration: Any = None,
    time_budget: float | None = None,
    relative: bool = False,
    batch_size: int = 1,
    samples: int | None = 256,
    seq_len: int = 128,
    runs: int = 20,
    proxy_batches: int = 4,
    exact_top: int = 3,
    tokenizer: Any = None,
    strict: bool = False,
    final_comparison: bool = True,
    progress: bool = True,
    workers: int = 1,
    ray_address: str | None = None,
    executor: str | None = None,
    distill_fallback: bool = True,
) -> TuneResult:
    """Search `candidates` (default: w4 → w8a8-static → w8a8-dynamic → w8 → fp16) with layer
    fallback for the best model whose `metric` drops at most `max_drop` on `data`. Text data
    needs `tokenizer` (`lowbit.tune` opens a model from a path and finds its tokenizer).

    `max_drop` is absolute (0.01 = one point of accuracy) or, with `relative=True`, a fraction of
    the original's value (perplexity: an increase counts as a drop). `calibration` (batches or a
    CalibrationResult) serves every static trial; without it the first 32 samples of `data` are
    used. A GPTQ candidate ("w4-gptq") rounds against the calibration batches (the first 32
    samples when there are none); its layer fallback ranks modules by round-to-nearest's error,
    since GPTQ rounds a layer only inside its block. `time_budget` (seconds, from the call)
    bounds the wall time: a cheap safe candidate runs first, a trial starts only when the slowest
    so far still fits, the final comparison is skipped (and said so) when it would not, and the
    message names every candidate not tried.
    Returns the original model, plainly labelled, when nothing meets the budget (or raises
    AccuracyBudgetError when `strict`).

    `workers` > 1 measures the trials in that many local processes, `ray_address` as Ray tasks
    ("local" starts a Ray on this machine); `executor` ("serial", "processes", "ray") names the
    executor outright. The choice is the serial search's, and latency is timed here with every
    worker idle (lowbit.tune.parallel).

    When no candidate meets the budget and a time budget is left, the closest candidate is
    distilled (the original teaching it on the first half of `data`) and judged on the second
    half as one more trial (lowbit.tune.distilled); `distill_fallback=False` turns that off.
    """
    if objective not in ("size", "latency"):
        raise LowbitError(f"objective must be 'size' or 'latency', not {objective!r}")
    if max_drop < 0:
        raise LowbitError("max_drop must be zero or positive")
    spec = executor_spec(workers, ray_address, executor)
    original = model.eval()
    kind = infer_kind(original, metric)
    dataset = as_dataset(data)
    dataset = dataset.head(samples) if samples else dataset
    task = Task(kind, labels=dataset.labels if kind == "logits" else None)
    metric = metric or task.metrics()[0]
    batches = task_batches(dataset, kind, tokenizer, batch_size, seq_len)
    named = _candidates(candidates)
    started = time.monotonic()
    calibration_batches = task_batches(dataset.head(32), kind, tokenizer, 8, seq_len)
    shared = _calibration(original, named, calibration, calibration_batches, progress)
    with progress_bar(progress) as bar:
        bar.add_task("measuring the original", total=None)
        reference = collect_outputs(original, batches, task)
        proxy = _proxy(batches[:proxy_batches], kind)
        work = _Workload(original, task, metric, batches, reference, proxy, _primary_outputs(original, proxy),
                         _model_inputs(batches[0]), max_drop, relative,
                         _rounding_batches(calibration, calibration_batches))
        deadline = started + time_budget if time_budget else math.inf  # calibration counts too
        search = _search(spec, work, named, objective, shared, deadline, runs, exact_top, bar)
        search.run()
        judged_on = None
        if search.best is None and distill_fallback:
            from lowbit.tune.distilled import distillation_fallback  # it builds on this module

            judged_on = distillation_fallback(search, work, dataset, tokenizer, batch_size, seq_len, progress)
    compared_on = judged_on if judged_on is not None and search.best is not None else dataset
    return _result(search, work, named, original, compared_on, tokenizer, strict, final_comparison, {
        "kind": kind, "samples": len(dataset), "batch_size": batch_size, "seq_len": seq_len,
        "candidates": [name for name, _ in named], "time_budget": time_budget,
        "threads": torch.get_num_threads(), "search_seconds": time.monotonic() - started,
        "executor": _executor_note(spec), "rounds": getattr(search, "rounds", None)})


def _search(spec: ExecutorSpec, *args: Any) -> _BudgetSearch:
    if not spec.parallel:
        return _BudgetSearch(*args)
    from lowbit.tune.parallel import ParallelSearch  # it builds on this module

    return ParallelSearch(*args, spec=spec)


def _executor_note(spec: ExecutorSpec) -> str:
    if not spec.parallel:
        return "serial: every trial measured and timed in this process, one after another"
    address = f", {spec.address}" if spec.address else ""
    return (f"{spec.name} ({spec.workers} workers{address}); trials within budget timed in this process "
            "between rounds, with every worker idle")


def _result(search: _BudgetSearch, work: _Workload, named, original: nn.Module, dataset, tokenizer,
            strict: bool, final_comparison: bool, settings: dict[str, Any]) -> TuneResult:
    original_quality = _original_quality(work)
    base = {"trials": search.trials, "sensitivity": search.sensitivity, "objective": search.objective,
            "metric": work.metric, "max_drop": work.max_drop, "relative": work.relative,
            "original_quality": original_quality, "original_size_bytes": parameter_bytes(original),
            "settings": settings}
    if search.best is None:
        closest = min(search.trials, key=lambda trial: trial.drop, default=None)
        message = "No quantized candidate met the budget; the original model is returned unchanged."
        if closest is not None:
            message += (f" Closest: {closest.label}, {work.metric} {closest.quality:.4g} (drop "
                        f"{closest.drop:.4g} against a budget of {work.max_drop:g}).")
        message += _not_tried(search)
        result = TuneResult(original, None, None, met_budget=False, message=message, **base)
        if strict:
            raise AccuracyBudgetError(message, result)
        return result
    trial, model = search.best
    runtime_model = search.runtime_models.get(trial.label) if trial.runtime != "eager" else None
    comparison = None
    skipped_comparison = final_comparison and not search.fits(trials=0)
    if final_comparison and not skipped_comparison:
        measured = Settings(work.metric, (settings["batch_size"],), work.max_drop, work.relative,
                            samples=None, seq_len=settings["seq_len"])
        comparison = compare_models(original, runtime_model or model, dataset, measured, tokenizer=tokenizer,
                                    progress=False)
    message = (f"Chose {trial.label}: {work.metric} {trial.quality:.4g} (drop {trial.drop:.4g}, budget "
               f"{work.max_drop:g}), {trial.size_bytes / 2**20:.2f} MiB in memory")
    if runtime_model is not None:
        message += (f", run in ONNX Runtime (accuracy level {trial.accuracy_level}; save it with "
                    f"runtime='onnxruntime', accuracy_level={trial.accuracy_level})")
    speedup = trial.speedup
    if speedup is None and comparison is not None:
        speedup = comparison.speedups.get(str(settings["batch_size"]))
    if speedup is not None:
        message += f", {speedup:.2f}× the original's speed at batch {settings['batch_size']}"
    message += "." + _not_tried(search)
    if skipped_comparison:
        message += (" The final comparison was skipped to keep the time budget; measure the saved "
                    "model with lowbit compare.")
    return TuneResult(model, make_recipe(trial.recipe) if not trial.fallback_modules else _mixed_recipe(
        trial, named), comparison, met_budget=True, message=message, runtime_model=runtime_model, **base)


def _not_tried(search: _BudgetSearch) -> str:
    """' Not tried: w4 (the time budget would run out first); ... To try them: ...' or ''."""
    if not search.not_tried:
        return ""
    listed = "; ".join(f"{name} ({reason})" for name, reason in search.not_tried.items())
    timed_out = [name.split(" ")[0] for name, reason in search.not_tried.items() if "time budget" in reason]
    if not timed_out:
        return f" Not tried: {listed}."
    presets = ",".join(name for name in dict.fromkeys(timed_out) if name in PRESETS)
    how = "raise --time-budget (time_budget=)" + (f", or pass only them: --candidates {presets}"
                                                   if presets else "")
    return f" Not tried: {listed}. To try those the time budget left out, {how}."


def _mixed_recipe(trial: Trial, named: list[tuple[str, Recipe]]) -> Recipe:
    """The chosen recipe with its fallback modules as per-module overrides (or skips)."""
    recipe = make_recipe(trial.recipe)
    index = next(i for i, (_, candidate) in enumerate(named) if candidate == recipe)
    if index + 1 < len(named):
        safer = named[index + 1][1]
        return make_recipe(recipe, overrides={**recipe.overrides,
                                              **dict.fromkeys(trial.fallback_modules, safer)})
    return make_recipe(recipe, skip=(*recipe.skip, *trial.fallback_modules))
