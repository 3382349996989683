"""Tune's search with its trials on an executor: local worker processes or Ray tasks.

The trials are pure work (lowbit.tune.search.measure_trial and rank_modules: a model, a recipe,
the data, the settings in; numbers out), so they can run anywhere. The search policy stays the
serial one (lowbit.tune.search._BudgetSearch), so the choice is the one the serial search makes
on the same data:

1. Every candidate is measured as it is, all at once.
2. The candidates over budget get their sensitivity rankings, all at once.
3. Their layer fallback runs in rounds: round k measures each still-open candidate with its 2^k
   most sensitive modules moved to the next safer candidate, all at once; a candidate closes at
   its first accepted trial, as in the serial search.
4. The serial policy then replays over these measurements (same order, skips and early stop);
   a trial it would not have run is dropped, one it needs is always there.

Latency is never measured while a trial runs: with objective "latency", each trial within the
budget is rebuilt here and timed once against the original between rounds, when every worker is
idle. The chosen model is rebuilt here from its recipe (quantization is
deterministic). Each trial records the node that measured it. A time budget stops new rounds
(the first always runs) and the final comparison as in the serial search; with one, the choice
can differ from the serial search's, which spends its time differently.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError, LowbitWarning
from lowbit.transform.calibrate import CalibrationResult
from lowbit.transform.recipe import Recipe, make_recipe
from lowbit.tune.executors import ExecutorSpec, Outcome, open_executor
from lowbit.tune.search import (
    Trial,
    _bits,
    _BudgetSearch,
    _label,
    _Workload,
    measure_trial,
    quantize_trial,
    rank_modules,
)

Key = tuple[str, tuple[str, ...]]  # (candidate name, modules moved)


@dataclass(frozen=True)
class Unit:
    """One piece of pure work: measure `recipe` with `moved` modules on the safer recipe, or
    (kind "ranking") rank the modules by their sensitivity to it."""

    kind: str
    name: str
    recipe: Recipe
    safer: tuple[str, Recipe] | None
    moved: tuple[str, ...] = ()
    threads: int = 1  # torch threads: the caller's, shared out among the units running at once


@dataclass
class Shared:
    """What every unit reads, sent to each worker once."""

    work: _Workload
    calibration: CalibrationResult | None
    exact_top: int


def run_unit(shared: Shared, unit: Unit) -> Any:
    """A Trial (kind "trial") or a ranking: what a worker computes and sends back."""
    torch.set_num_threads(unit.threads)
    if unit.kind == "ranking":
        return rank_modules(shared.work, shared.calibration, unit.recipe, unit.safer, shared.exact_top)
    trial, _ = measure_trial(shared.work, shared.calibration, unit.name, unit.recipe, list(unit.moved),
                             unit.safer)
    return trial


def _failed(unit: Unit, outcome: Outcome) -> Trial:
    """The record of a trial whose worker failed (died twice, or raised): the search goes on."""
    label = _label(unit.name, list(unit.moved), unit.safer and unit.safer[0])
    return Trial(label, unit.recipe.model_dump(mode="json"), math.nan, math.inf, 0, False,
                 f"could not measure: {outcome.error} ({outcome.attempts} attempt(s))", list(unit.moved),
                 seconds=outcome.seconds, candidate=unit.name, node=outcome.node)


class ParallelSearch(_BudgetSearch):
    """The serial search's policy over trials measured on an executor beforehand."""

    def __init__(self, *args: Any, spec: ExecutorSpec, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.spec = spec
        self.measured: dict[Key, Trial] = {}
        self.rankings: dict[str, list[dict[str, Any]]] = {}
        self.timings: dict[Key, dict[str, Any]] = {}
        self.rounds: list[list[float]] = []  # seconds of each unit, round by round (for projections)
        self.session: Any = None
        self.replaying = False

    def run(self) -> None:
        step = self.bar.add_task(f"measuring trials on {self.spec.name}", total=None)
        shared = Shared(self.work, self.calibration, self.exact_top)
        with open_executor(self.spec, shared) as session:
            self.session = session
            self._measure_all(step)
        self.bar.update(step, description="choosing")
        self.replaying = True
        super().run()
        self.replaying = False
        if self.best is not None and self.best[1] is None:
            self.best = (self.best[0], self._rebuild(self.best[0]))

    # -- the measurements, in parallel ------------------------------------------------------------
    def _measure_all(self, step: Any) -> None:
        self._candidates_as_they_are(step)
        first = {name: self.measured.get((name, ())) for name, _ in self.candidates}  # None: skipped
        missed = [(index, name, recipe) for index, (name, recipe) in enumerate(self.candidates)
                  if self._safer(index) is not None and first[name] is not None and not first[name].accepted
                  and not first[name].reason]
        if missed and self._skipped_by_serial(missed[0][2]):  # exact for the first one only
            missed = missed[1:]
        if self.out_of_time():
            missed = []  # the replay records them as not measured
        units = [Unit("ranking", name, recipe, self._safer(index)) for index, name, recipe in missed]
        for unit, outcome in zip(units, self._run(units, step), strict=True):
            self.rankings[unit.name] = outcome.value if outcome.ok else []
            if not outcome.ok:
                self.not_tried[f"{unit.name} with layer fallback"] = (
                    f"ranking its modules failed: {outcome.error}")
        count, open_ = 1, missed
        while open_ and not self.out_of_time():
            open_ = [item for item in open_ if count <= len(self.rankings[item[1]]) // 2]
            units = [Unit("trial", name, recipe, self._safer(index), self._most_sensitive(name, count))
                     for index, name, recipe in open_]
            self._round(units, step)
            open_ = [item for item, unit in zip(open_, units, strict=True) if not self._accepted(unit)]
            count *= 2

    def _candidates_as_they_are(self, step: Any) -> None:
        """Every candidate the serial search would measure as it is, `workers` at a time in the
        serial order. A candidate is left out only when every one before it is measured and the
        serial search would skip it (it cannot be smaller than the best so far): then the
        decision is the serial one; otherwise it is measured (a measurement too many is dropped
        by the replay, one too few would change it)."""
        order = self._serial_order()
        pending, skipped = list(order), set()
        while pending and not (self.rounds and self.out_of_time()):  # the first wave always runs
            wave: list[int] = []
            for index in list(pending):
                if len(wave) == self.spec.workers:
                    break
                earlier = order[: order.index(index)]
                known = all(i in skipped or (self.candidates[i][0], ()) in self.measured for i in earlier)
                if known and self._skipped_by_serial(self.candidates[index][1], earlier):
                    pending.remove(index)
                    skipped.add(index)
                    continue
                wave.append(index)
            pending = [index for index in pending if index not in wave]
            self._round([Unit("trial", *self.candidates[index], self._safer(index)) for index in wave], step)

    def _serial_order(self) -> list[int]:
        early = self._early()
        return ([early] if early is not None else []) + [i for i in range(len(self.candidates)) if i != early]

    def _skipped_by_serial(self, recipe: Recipe, earlier: list[int] | None = None) -> bool:
        """Whether the serial search would skip `recipe`: objective size, and a best trial so far
        (among the candidates `earlier`, as they are) with as few weight bits."""
        if self.objective != "size":
            return False
        indices = range(len(self.candidates)) if earlier is None else earlier
        best = None
        for index in indices:
            trial = self.measured.get((self.candidates[index][0], ()))
            if trial is not None and trial.accepted and not trial.reason and (
                    best is None or (trial.size_bytes, trial.drop) < (best.size_bytes, best.drop)):
                best = trial
        return best is not None and _bits(recipe) >= _bits(make_recipe(best.recipe))

    def _most_sensitive(self, name: str, count: int) -> tuple[str, ...]:
        return tuple(row["name"] for row in self.rankings[name][:count])

    def _safer(self, index: int) -> tuple[str, Recipe] | None:
        return self.candidates[index + 1] if index + 1 < len(self.candidates) else None

    def _round(self, units: list[Unit], step: Any) -> None:
        """Measure `units` on the executor, then time the ones within budget here, alone."""
        outcomes = self._run(units, step)
        unsent = [outcome.error for outcome in outcomes
                  if (outcome.error or "").startswith("it could not be sent")]
        if unsent and len(unsent) == len(outcomes):
            raise LowbitError(f"tune cannot hand this model to {self.spec.name} workers ({unsent[0]}); with "
                              "workers or Ray the model and its data must pickle, and its classes import "
                              "in a fresh process. Run with workers=1")
        for unit, outcome in zip(units, outcomes, strict=True):
            self.measured[(unit.name, unit.moved)] = outcome.value if outcome.ok else _failed(unit, outcome)
        if self.objective == "latency":
            for unit in units:
                self._latency_of(unit.name, unit.moved)

    def _run(self, units: list[Unit], step: Any) -> list[Outcome]:
        if not units:
            return []
        self.bar.update(step, description=f"measuring {len(units)} {units[0].kind}s on {self.spec.name}")
        threads = max(1, torch.get_num_threads() // min(self.spec.workers, len(units)))
        units = [dataclasses.replace(unit, threads=threads) for unit in units]
        outcomes = self.session.map(run_unit, units, on_done=lambda *_: self.bar.advance(step))
        self.rounds.append([outcome.seconds for outcome in outcomes])
        return outcomes

    def _accepted(self, unit: Unit) -> bool:
        """Whether the serial search would stop its fallback at this trial."""
        trial = self.measured[(unit.name, unit.moved)]
        if not trial.accepted:
            return False
        return self.objective != "latency" or self._latency_of(unit.name, unit.moved)["speedup"] > 1.0

    def _latency_of(self, name: str, moved: tuple[str, ...]) -> dict[str, Any]:
        """The timing of a trial within budget, measured once, here, with every worker idle."""
        key = (name, moved)
        if key not in self.timings and self.measured[key].accepted:
            self.timings[key] = super()._timing(self.measured[key], self._rebuild(self.measured[key]))
        return self.timings.get(key, {})

    def _rebuild(self, trial: Trial) -> nn.Module:
        """The trial's model, built again here from its recipe (quantization is deterministic)."""
        index = [name for name, _ in self.candidates].index(trial.candidate)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", LowbitWarning)  # the trial recorded them when measured
            return quantize_trial(self.work, self.calibration, self.candidates[index][1],
                                  trial.fallback_modules, self._safer(index))

    # -- the serial policy, replayed over the measurements ------------------------------------------
    def _measure(self, name: str, recipe: Recipe, moved: list[str], safer: tuple[str, Recipe] | None
                 ) -> tuple[Trial, nn.Module | None]:
        key = (name, tuple(moved))
        if key not in self.measured:  # the time budget stopped the rounds before this one
            label = _label(name, moved, safer and safer[0])
            unmeasured = Trial(label, recipe.model_dump(mode="json"), math.nan, math.inf, 0, False,
                               "not measured: the time budget stopped the rounds first", moved,
                               candidate=name)
            return unmeasured, None
        return copy.deepcopy(self.measured[key]), None

    def _timing(self, trial: Trial, model: nn.Module | None) -> dict[str, Any]:
        return self._latency_of(trial.candidate, tuple(trial.fallback_modules))

    def _ranking(self, name: str, recipe: Recipe, safer: tuple[str, Recipe]) -> list[dict[str, Any]]:
        return self.rankings[name]

    def fits(self, trials: float = 1.0) -> bool:
        """The replay follows the measurements, not the clock (the rounds kept the time budget);
        afterwards (the final comparison) the clock decides again."""
        return self.replaying or super().fits(trials)

