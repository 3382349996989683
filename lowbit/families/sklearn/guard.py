"""The fidelity guard: every float array as small as it can be without changing a prediction,
on the reference data and, as far as can be estimated, on data it has not seen.

Start with every array at the smallest rung of its ladder. A candidate fails when, on the rows
it climbs on:
- a prediction changes;
- a probability moves by more than half the tolerance;
- or its mean change of each row's margin (the gap between its best and second-best class),
  times the density of rows near the decision boundary (k / (n · m_k), from the k-th smallest
  margin), estimates that more than TARGET_FLIP_RATE of unseen rows would change. Margins near
  zero spread about evenly, so rows that move d on average flip about density · d of them.
Failing, it finds the arrays that fail on their own and moves each up one rung (when none does
alone, the quarter that move the outputs most alone), until nothing fails.

A fifth of the reference rows (HOLD_OUT) is kept out of that climb, and the result is checked
on them: the changed predictions there, out of how many, are reported with their exact 95%
interval beside the estimated rate. If a row there changed, or a probability moved past the
tolerance, the climb goes on over every row, so the model written never changes a reference
prediction.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.stats import beta

from lowbit.families.sklearn.encodings import Encoded, decode, encode, ladder
from lowbit.families.sklearn.slots import Slot, is_coefficient
from lowbit.progress import progress_bar

PROBABILITY_TOLERANCE = 0.01  # largest allowed change of a predicted probability
HOLD_OUT = 0.2  # share of the reference rows kept out of the climb, to check the result on
MIN_HELD_OUT = 20  # fewer reference rows than this per part: climb on all, estimate nothing
SAFETY = 0.5  # on the rows it climbs on, a probability may move at most this share of the tolerance
TARGET_FLIP_RATE = 1e-4  # largest estimated share of unseen rows whose prediction may change
PROGRESS_FROM = 20  # a model with more arrays than this shows the guard's progress
MARGIN_RANK = 10  # the density of margins near zero is read at the 10th smallest margin


@dataclass
class GuardResult:
    """Per array: the chosen encoding; the arrays that fell back, and the differences left."""

    encodings: dict[str, Encoded]
    fallbacks: dict[str, list[str]] = field(default_factory=dict)
    prediction_differences: int | None = None
    max_probability_difference: float | None = None
    verified: bool = False
    held_out: dict[str, Any] | None = None  # the check on rows the climb did not see


def flip_rate(changed: int, rows: int) -> dict[str, Any]:
    """`changed` of `rows` held-out predictions changed: the rate and its exact (Clopper-Pearson)
    95% interval."""
    low = 0.0 if changed == 0 else float(beta.ppf(0.025, changed, rows - changed + 1))
    high = 1.0 if changed == rows else float(beta.ppf(0.975, changed + 1, rows - changed))
    return {"rows": rows, "changed": changed, "rate": changed / rows, "ci95": [low, high]}


def take_rows(data: Any, indices: np.ndarray) -> Any:
    """Rows `indices` of texts, an array, a sparse matrix or a DataFrame."""
    if isinstance(data, (list, tuple)):
        return [data[i] for i in indices]
    return data.iloc[indices] if hasattr(data, "iloc") else data[indices]


def row_count(data: Any) -> int:
    return data.shape[0] if hasattr(data, "shape") else len(data)


def _split(data: Any) -> tuple[Any, Any | None]:
    """(rows to climb on, held-out rows), a seeded shuffle; no held-out part for little data."""
    rows = row_count(data)
    held = int(rows * HOLD_OUT)
    if held < MIN_HELD_OUT:
        return data, None
    order = np.random.default_rng(0).permutation(rows)
    return take_rows(data, np.sort(order[held:])), take_rows(data, np.sort(order[:held]))


def predictions(estimator: Any, data: Any) -> dict[str, np.ndarray]:
    """What the guard compares: predict always; predict_proba / transform where they exist."""
    outputs = {}
    if hasattr(estimator, "predict"):
        outputs["predict"] = np.asarray(estimator.predict(data))
    elif hasattr(estimator, "transform"):
        transformed = estimator.transform(data)
        dense = transformed.todense() if hasattr(transformed, "todense") else transformed
        outputs["transform"] = np.asarray(dense)
    if hasattr(estimator, "predict_proba"):
        # e.g. SVC without probability=True advertises predict_proba but cannot
        with contextlib.suppress(AttributeError, NotImplementedError):
            outputs["predict_proba"] = np.asarray(estimator.predict_proba(data))
    if hasattr(estimator, "decision_function") and hasattr(estimator, "classes_"):
        with contextlib.suppress(AttributeError, NotImplementedError):
            outputs["scores"] = np.asarray(estimator.decision_function(data), dtype=np.float64)
    if "scores" not in outputs and "predict_proba" in outputs:
        outputs["scores"] = outputs["predict_proba"]
    return outputs


def margins(scores: np.ndarray) -> np.ndarray:
    """Per row, how far its predicted class is from the next: |score| for a binary decision
    function, else the best score less the second best."""
    if scores.ndim == 1 or scores.shape[1] == 1:
        return np.abs(scores.reshape(len(scores)))
    top = np.sort(scores, axis=1)
    return top[:, -1] - top[:, -2]


def margin_density(reference: dict[str, np.ndarray]) -> float:
    """How many rows per unit of score lie near the decision boundary: k / (n · m_k), with m_k
    the k-th smallest positive margin (k = MARGIN_RANK; exact ties, which no encoding short of
    exact keeps, and rows with non-finite scores are left out). A score change of d then flips
    about density · d of the rows of unseen data, since margins near zero spread about evenly;
    0 when the model has no scores (a regressor, a transform)."""
    if "scores" not in reference:
        return 0.0
    scores = reference["scores"]
    found = margins(scores[_finite_rows(scores)])
    positive = np.sort(found[found > 0])
    rank = min(MARGIN_RANK, len(positive))
    if rank == 0:
        return 0.0
    return rank / (len(found) * float(positive[rank - 1]))


@dataclass(frozen=True)
class Drift:
    """How far a candidate's outputs moved from the original's on some rows."""

    changed: int
    probability: float
    score: float  # the mean margin change (`margin_shift`)

    def flip_risk(self, density: float) -> float:
        """The estimated share of unseen rows whose prediction this drift would change: rows
        lie about `density` per unit of margin near the boundary, and move `score` on average."""
        return 0.0 if self.score == 0 else min(1.0, density * self.score)

    def within(self, tolerance: float, density: float = 0.0, share: float = 1.0) -> bool:
        return (not self.changed and self.probability <= tolerance * share
                and self.flip_risk(density) <= TARGET_FLIP_RATE)


def same_predictions(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Per sample, whether two outputs agree: exactly for labels, within float rounding
    (relative 1e-6) for regressor outputs and transforms."""
    if np.issubdtype(before.dtype, np.floating):
        same = np.isclose(before, after, rtol=1e-6, atol=1e-12)
    else:
        same = before == after
    return same.reshape(len(before), -1).all(axis=1)


def _finite_rows(values: np.ndarray) -> np.ndarray:
    """Rows whose every output is a finite number (NaN and inf outputs of the original itself
    are not the guard's to judge: a row where the original says NaN cannot move away from it)."""
    return np.isfinite(values.reshape(len(values), -1)).all(axis=1)


def _largest_gap(before: np.ndarray, after: np.ndarray) -> float:
    """The largest change over the rows the original answers with finite numbers; a candidate
    that turns one of them into NaN or inf moves it infinitely far."""
    rows = _finite_rows(before)
    gap = np.abs(before[rows] - after[rows])
    return float(np.nan_to_num(np.max(gap, initial=0.0), nan=np.inf))


def margin_shift(before: np.ndarray, after: np.ndarray) -> float:
    """The mean change, over rows, of the margin between each row's original best and
    second-best class (of |score| for a binary decision function): how far a candidate moves
    rows towards or away from the boundary, on average (rows with finite original scores)."""
    rows = _finite_rows(before)
    before, after = before[rows], after[rows]
    if not len(before):
        return 0.0
    if before.ndim == 1 or before.shape[1] == 1:
        shift = np.mean(np.abs(after.reshape(len(after)) - before.reshape(len(before))))
    else:
        index = np.arange(len(before))
        order = np.argsort(before, axis=1)
        best, second = order[:, -1], order[:, -2]
        gap_before = before[index, best] - before[index, second]
        gap_after = after[index, best] - after[index, second]
        shift = np.mean(np.abs(gap_after - gap_before))
    return float(np.nan_to_num(shift, nan=np.inf))


def differences(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray]) -> Drift:
    """Samples whose prediction differs, the largest probability change and the mean margin
    change (`margin_shift`). Regressor outputs and transforms count as different beyond float
    rounding."""
    key = "predict" if "predict" in reference else "transform"
    changed = int(np.sum(~same_predictions(reference[key], candidate[key])))
    probability = shift = 0.0
    if "predict_proba" in reference and "predict_proba" in candidate:
        probability = _largest_gap(reference["predict_proba"], candidate["predict_proba"])
    if "scores" in reference and "scores" in candidate:
        shift = margin_shift(reference["scores"], candidate["scores"])
    return Drift(changed, probability, shift)


class _Applied:
    """The estimator's arrays as currently set: a slot is written only when its encoding
    changes (a tree's setter copies the whole node table)."""

    def __init__(self, slots: dict[str, Slot]) -> None:
        self.slots, self.current = slots, {}

    def apply(self, encodings: dict[str, Encoded]) -> None:
        for path, encoded in encodings.items():
            if self.current.get(path) is not encoded:
                self.slots[path].set(decode(encoded))
                self.current[path] = encoded


class _LadderClimb:
    """The guard's state: each array's ladder and current rung, and the encodings tried so far."""

    def __init__(self, slots: list[Slot], bits: int, estimator: Any, data: Any, tolerance: float,
                 weight_threshold: float) -> None:
        self.applied = _Applied({slot.path: slot for slot in slots})
        self.originals = {slot.path: slot.get().copy(order="K") for slot in slots}
        self.rungs = {slot.path: ladder(max(bits, slot.min_bits), self.originals[slot.path],
                                        pruned=weight_threshold > 0 and is_coefficient(slot.path))
                      for slot in slots}
        self.level = dict.fromkeys(self.originals, 0)
        self.fallbacks: dict[str, list[str]] = {}
        self.cache: dict[tuple[str, str], Encoded] = {}
        self.estimator, self.data = estimator, data
        self.tolerance, self.threshold = tolerance, weight_threshold
        self.reference = predictions(estimator, data)
        self.density = margin_density(self.reference)

    def retarget(self, data: Any) -> None:
        """Judge candidates on other rows from now on (the original's outputs on them first)."""
        self.applied.apply({path: self.encoded(path, "exact") for path in self.originals})
        self.data, self.reference = data, predictions(self.estimator, data)
        self.density = margin_density(self.reference)

    def encoded(self, path: str, rung: str) -> Encoded:
        if (path, rung) not in self.cache:
            self.cache[path, rung] = encode(self.originals[path], rung, self.threshold)
        return self.cache[path, rung]

    def rung(self, path: str, step: int = 0) -> str:
        return self.rungs[path][self.level[path] + step]

    def current(self) -> dict[str, Encoded]:
        return {path: self.encoded(path, self.rung(path)) for path in self.originals}

    def check(self, chosen: dict[str, Encoded]) -> Drift:
        """How far `chosen` moves the outputs; a model the rounding broke (a scale rounded to
        zero makes NaN, which the estimator refuses) counts as every prediction changed."""
        self.applied.apply(chosen)
        try:
            with np.errstate(all="ignore"):
                return differences(self.reference, predictions(self.estimator, self.data))
        except (ValueError, FloatingPointError, ZeroDivisionError):
            return Drift(len(next(iter(self.reference.values()))), math.inf, math.inf)

    def passes(self, drift: Drift) -> bool:
        return drift.within(self.tolerance, self.density, SAFETY)

    def fails(self, chosen: dict[str, Encoded]) -> bool:
        return not self.passes(self.check(chosen))

    def climb(self, path: str) -> None:
        self.fallbacks.setdefault(path, [self.rung(path)])
        self.level[path] += 1
        self.fallbacks[path].append(self.rung(path))

    def changes_alone(self, group: list[str]) -> bool:
        """Whether quantizing only `group` (every other array exact) changes predictions."""
        trial = {path: self.encoded(path, "exact") for path in self.originals}
        trial.update((path, self.encoded(path, self.rung(path))) for path in group)
        return self.fails(trial)

    def culprits(self, group: list[str]) -> list[str]:
        """Arrays of `group` that change predictions on their own, found by halving: a group
        that changes nothing alone holds no culprit, so a few among many cost few checks."""
        if not group or not self.changes_alone(group):
            return []
        if len(group) == 1:
            return group
        middle = len(group) // 2
        return self.culprits(group[:middle]) + self.culprits(group[middle:])

    def most_moving(self) -> list[str]:
        """When only the arrays together fail: the quarter (at least one) that move the outputs
        most on their own, so a model of many arrays climbs in a few rounds of one check each."""
        movable = [path for path in self.originals if self.rung(path) != "exact"]
        exact = {path: self.encoded(path, "exact") for path in self.originals}
        moved = {}
        for path in movable:
            drift = self.check({**exact, path: self.encoded(path, self.rung(path))})
            moved[path] = (drift.changed, drift.probability, drift.score)
        ranked = sorted(movable, key=moved.get, reverse=True)
        return ranked[:max(1, len(ranked) // 4)]

    def run(self) -> GuardResult:
        """Climb until nothing fails (every array exact moves nothing, so this ends)."""
        with progress_bar(len(self.originals) > PROGRESS_FROM) as bar:
            step = bar.add_task(f"fidelity guard over {len(self.originals)} arrays", total=None)
            drift = self.check(self.current())
            while not self.passes(drift):
                movable = [path for path in self.originals if self.rung(path) != "exact"]
                if not movable:
                    break  # every array exact: the model is the original, whatever the drift says
                for path in self.culprits(movable) or self.most_moving():
                    self.climb(path)
                bar.advance(step)
                drift = self.check(self.current())
        return GuardResult(self.current(), self.fallbacks, drift.changed, drift.probability, verified=True)


def guard(slots: list[Slot], bits: int, estimator: Any, data: Any,
          tolerance: float = PROBABILITY_TOLERANCE, weight_threshold: float = 0.0) -> GuardResult:
    """Choose an encoding per slot (see the module docstring); leaves `estimator` computing with
    the chosen, decoded arrays. A `weight_threshold` first tries coefficient arrays pruned."""
    climbing, held_out = _split(data)
    search = _LadderClimb(slots, bits, estimator, climbing, tolerance, weight_threshold)
    result = search.run()
    if held_out is None:
        return result
    search.retarget(held_out)
    drift = search.check(search.current())
    check = {**flip_rate(drift.changed, row_count(held_out)),
             "estimated_flip_rate": drift.flip_risk(search.density),
             "max_probability_difference": drift.probability}
    check["refit_on_all"] = bool(drift.changed or drift.probability > tolerance)
    if check["refit_on_all"]:  # finish on every row: no reference row changes in the model written
        search.retarget(data)
        result = search.run()
    result.held_out = check
    return result
