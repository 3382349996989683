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

Latency is never measured while a trial runs: with objective "latency", the trials within the
budget are rebuilt here and timed against the original between rounds, when every worker is idle
(finalists re-timed alone). The chosen model is rebuilt here from its recipe (quantization is
deterministic). Each trial records the node that measured it. A time budget stops new rounds;
with one, the choice can differ from the serial search's, which spends its time differently.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

from torch import nn

from lowbit.errors import LowbitError
from lowbit.transform.calibrate import CalibrationResult
from lowbit.transform.recipe import Recipe
from lowbit.tune.executors import ExecutorSpec, Outcome, run_all
from lowbit.tune.search import Trial, _BudgetSearch, _label, _Workload, measure_trial, rank_modules

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


@dataclass
class Shared:
    """What every unit reads, sent to each worker once."""

    work: _Workload
    calibration: CalibrationResult | None
    exact_top: int


def run_unit(shared: Shared, unit: Unit) -> Any:
    """A Trial (kind "trial") or a ranking: what a worker computes and sends back."""
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

    def run(self) -> None:
        step = self.bar.add_task(f"measuring trials on {self.spec.name}", total=None)
        self._measure_all(step)
        self.bar.update(step, description="choosing")
        super().run()
        if self.best is not None and self.best[1] is None:
            self.best = (self.best[0], self._rebuild(self.best[0]))

    # -- the measurements, in parallel ------------------------------------------------------------
    def _measure_all(self, step: Any) -> None:
        safer = {name: self._safer(index) for index, (name, _) in enumerate(self.candidates)}
        self._round([Unit("trial", name, recipe, safer[name]) for name, recipe in self.candidates], step)
        missed = [(name, recipe) for name, recipe in self.candidates
                  if safer[name] is not None and not self.measured[(name, ())].accepted
                  and not self.measured[(name, ())].reason]
        units = [Unit("ranking", name, recipe, safer[name]) for name, recipe in missed]
        for unit, outcome in zip(units, self._run(units, step), strict=True):
            self.rankings[unit.name] = outcome.value if outcome.ok else []
            if not outcome.ok:
                self.not_tried[f"{unit.name} with layer fallback"] = (
                    f"ranking its modules failed: {outcome.error}")
        count, open_ = 1, list(missed)
        while open_ and not self.out_of_time():
            open_ = [(name, recipe) for name, recipe in open_ if count <= len(self.rankings[name]) // 2]
            units = [Unit("trial", name, recipe, safer[name], self._most_sensitive(name, count))
                     for name, recipe in open_]
            self._round(units, step)
            open_ = [(name, recipe) for (name, recipe), unit in zip(open_, units, strict=True)
                     if not self._accepted(unit)]
            count *= 2

    def _most_sensitive(self, name: str, count: int) -> tuple[str, ...]:
        return tuple(row["name"] for row in self.rankings[name][:count])

    def _safer(self, index: int) -> tuple[str, Recipe] | None:
        return self.candidates[index + 1] if index + 1 < len(self.candidates) else None

    def _round(self, units: list[Unit], step: Any) -> None:
        """Measure `units` on the executor, then time the ones within budget here, alone."""
        for unit, outcome in zip(units, self._run(units, step), strict=True):
            self.measured[(unit.name, unit.moved)] = outcome.value if outcome.ok else _failed(unit, outcome)
        if self.objective == "latency":
            for unit in units:
                self._latency_of(unit.name, unit.moved)

    def _run(self, units: list[Unit], step: Any) -> list[Outcome]:
        if not units:
            return []
        self.bar.update(step, description=f"measuring {len(units)} {units[0].kind}s on {self.spec.name}")
        shared = Shared(self.work, self.calibration, self.exact_top)
        return run_all(run_unit, units, self.spec, on_done=lambda *_: self.bar.advance(step), shared=shared)

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
        index = [name for name, _ in self.candidates].index(trial.candidate)
        rebuilt = measure_trial(self.work, self.calibration, trial.candidate, self.candidates[index][1],
                                trial.fallback_modules, self._safer(index))[1]
        if rebuilt is None:
            raise LowbitError(f"tune: {trial.label} measured in a worker but cannot be rebuilt here")
        return rebuilt

    # -- the serial policy, replayed over the measurements ------------------------------------------
    def _measure(self, name: str, recipe: Recipe, moved: list[str], safer: tuple[str, Recipe] | None
                 ) -> tuple[Trial, nn.Module | None]:
        key = (name, tuple(moved))
        if key not in self.measured:  # the serial policy asks for a trial no round measured
            raise LowbitError(f"tune: no measurement of {name} with {len(moved)} modules moved")
        return copy.deepcopy(self.measured[key]), None

    def _timing(self, trial: Trial, model: nn.Module | None) -> dict[str, Any]:
        return self._latency_of(trial.candidate, tuple(trial.fallback_modules))

    def _ranking(self, name: str, recipe: Recipe, safer: tuple[str, Recipe]) -> list[dict[str, Any]]:
        return self.rankings[name]

    def fits(self, trials: float = 1.0) -> bool:
        """The replay follows the measurements, not the clock (the rounds kept the time budget)."""
        return True

