"""The fidelity guard: every float array as small as it can be without changing a prediction.

Start with every array at the smallest rung of its ladder. If predictions on the reference data
differ from the original's, find the arrays that change predictions on their own and move each
up one rung (when none does alone, the one whose next rung helps most); repeat until the whole
model predicts exactly as the original did.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lowbit.families.sklearn.encodings import Encoded, decode, encode, ladder
from lowbit.families.sklearn.slots import Slot, is_coefficient

PROBABILITY_TOLERANCE = 0.01  # largest allowed change of a predicted probability


@dataclass
class GuardResult:
    """Per array: the chosen encoding; the arrays that fell back, and the differences left."""

    encodings: dict[str, Encoded]
    fallbacks: dict[str, list[str]] = field(default_factory=dict)
    prediction_differences: int | None = None
    max_probability_difference: float | None = None
    verified: bool = False


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
    return outputs


def same_predictions(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Per sample, whether two outputs agree: exactly for labels, within float rounding
    (relative 1e-6) for regressor outputs and transforms."""
    if np.issubdtype(before.dtype, np.floating):
        same = np.isclose(before, after, rtol=1e-6, atol=1e-12)
    else:
        same = before == after
    return same.reshape(len(before), -1).all(axis=1)


def differences(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray]) -> tuple[int, float]:
    """(samples whose prediction differs, largest probability difference). Regressor outputs and
    transforms count as different beyond float rounding (relative 1e-6)."""
    key = "predict" if "predict" in reference else "transform"
    changed = int(np.sum(~same_predictions(reference[key], candidate[key])))
    probability = 0.0
    if "predict_proba" in reference and "predict_proba" in candidate:
        gap = np.abs(reference["predict_proba"] - candidate["predict_proba"])
        probability = float(np.max(gap, initial=0.0))
    return changed, probability


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

    def encoded(self, path: str, rung: str) -> Encoded:
        if (path, rung) not in self.cache:
            self.cache[path, rung] = encode(self.originals[path], rung, self.threshold)
        return self.cache[path, rung]

    def rung(self, path: str, step: int = 0) -> str:
        return self.rungs[path][self.level[path] + step]

    def current(self) -> dict[str, Encoded]:
        return {path: self.encoded(path, self.rung(path)) for path in self.originals}

    def check(self, chosen: dict[str, Encoded]) -> tuple[int, float]:
        """Differences from the original; a model the rounding broke (a scale rounded to zero
        makes NaN, which the estimator refuses) counts as every prediction changed."""
        self.applied.apply(chosen)
        try:
            with np.errstate(all="ignore"):
                return differences(self.reference, predictions(self.estimator, self.data))
        except (ValueError, FloatingPointError, ZeroDivisionError):
            return len(next(iter(self.reference.values()))), float("inf")

    def fails(self, chosen: dict[str, Encoded]) -> bool:
        changed, probability = self.check(chosen)
        return bool(changed) or probability > self.tolerance

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

    def most_helpful(self) -> list[str]:
        """When only the arrays together change predictions: the one whose next rung helps most."""
        scores = {}
        for path in self.originals:
            if self.rung(path) != "exact":
                trial = self.current()
                trial[path] = self.encoded(path, self.rung(path, 1))
                scores[path] = self.check(trial)
        return [min(scores, key=scores.get)]

    def run(self) -> GuardResult:
        """Climb until nothing differs (every array exact differs in nothing, so this ends)."""
        changed, probability = self.check(self.current())
        while changed or probability > self.tolerance:
            movable = [path for path in self.originals if self.rung(path) != "exact"]
            for path in self.culprits(movable) or self.most_helpful():
                self.climb(path)
            changed, probability = self.check(self.current())
        return GuardResult(self.current(), self.fallbacks, changed, probability, verified=True)


def guard(slots: list[Slot], bits: int, estimator: Any, data: Any,
          tolerance: float = PROBABILITY_TOLERANCE, weight_threshold: float = 0.0) -> GuardResult:
    """Choose an encoding per slot (see the module docstring); leaves `estimator` computing with
    the chosen, decoded arrays. A `weight_threshold` first tries coefficient arrays pruned."""
    return _LadderClimb(slots, bits, estimator, data, tolerance, weight_threshold).run()
