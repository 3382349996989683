"""tune's last resort: when no post-training candidate meets the accuracy budget, the closest one
is trained back by distillation (lowbit.distill, the original as teacher) in the time left, and
judged on samples it did not train on. A static candidate's activation ranges train too (they
start from the calibrated ones).

The data is split in two: the first half teaches, the second half judges (against the original
on that same half). Distillation runs only under a time budget, with at least MIN_SECONDS of
training left after room for measuring it and the final comparison; otherwise the report says
why it was not tried.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
import warnings
from typing import Any

from lowbit.data.batches import task_batches, training_inputs
from lowbit.data.datasets import Dataset
from lowbit.errors import LowbitError, LowbitWarning
from lowbit.evaluate.size import parameter_bytes
from lowbit.evaluate.tasks import collect_outputs
from lowbit.transform.distill import distill
from lowbit.transform.qat import convert, prepare
from lowbit.transform.recipe import make_recipe
from lowbit.tune.executors import node_name
from lowbit.tune.search import BUDGET_TOLERANCE, Trial, _BudgetSearch, _score, _Workload

MIN_SECONDS = 10.0
MIN_SAMPLES = 16
LEARNING_RATE = 1e-4


def distillation_fallback(search: _BudgetSearch, work: _Workload, dataset: Dataset, tokenizer: Any,
                          batch_size: int, seq_len: int, progress: bool) -> Dataset | None:
    """Distil the closest candidate when nothing met the budget; the half of `dataset` it was
    judged on (what the final comparison should use if it is chosen), or None if not tried."""
    plain = [trial for trial in search.trials if math.isfinite(trial.drop) and not trial.fallback_modules]
    closest = min(plain, key=lambda trial: trial.drop, default=None)
    if closest is None:
        return None
    name = f"{closest.candidate} + distillation"
    reason = _why_not(search, dataset)
    if reason:
        search.not_tried[name] = reason
        return None
    start = time.monotonic()
    half = len(dataset) // 2
    train, held = dataset.head(half), dataset.part(half)
    judged = _judged_on(work, held, tokenizer, batch_size, seq_len)
    seconds = search.deadline - time.monotonic() - 2 * search.trial_cost()
    recipe = make_recipe(closest.recipe)
    learn_ranges = recipe.scheme == "static"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", LowbitWarning)  # the candidate's trial recorded them
            prepared = prepare(work.model, recipe, calibration=work.rounding_batches, progress=False,
                               learn_ranges=learn_ranges)
            result = distill(prepared, work.model, training_inputs(train, 16), time_budget=max(seconds, 1.0),
                             tokenizer=tokenizer, lr=LEARNING_RATE, max_length=seq_len, progress=progress)
            model = convert(prepared, progress=False)
    except LowbitError as error:
        search.not_tried[name] = f"could not distill: {error}"
        return None
    quality, drop = _score(judged, model)
    accepted = drop <= work.max_drop + BUDGET_TOLERANCE
    learned = ", activation ranges trained too" if learn_ranges else ""
    note = (f"distilled {result.steps} steps ({result.seconds:.0f} s) on the first {half} samples{learned}; "
            f"judged on the other {len(held)}, which it did not train on")
    trial = Trial(name, closest.recipe, quality, drop, parameter_bytes(model), accepted, "", notes=[note],
                  candidate=closest.candidate, node=node_name())
    trial.seconds = time.monotonic() - start
    search.consider(trial, model, functools.partial(_BudgetSearch._timing, search))
    return held


def _judged_on(work: _Workload, held: Dataset, tokenizer: Any, batch_size: int, seq_len: int) -> _Workload:
    """The workload scored on the held-out samples only (their labels, the original's outputs)."""
    task = dataclasses.replace(work.task, labels=held.labels if work.task.labels is not None else None)
    batches = task_batches(held, task.kind, tokenizer, batch_size, seq_len)
    reference = collect_outputs(work.model, batches, task)
    return dataclasses.replace(work, task=task, batches=batches, reference=reference)


def _why_not(search: _BudgetSearch, dataset: Dataset) -> str | None:
    if math.isinf(search.deadline):
        return "distillation runs only within a time budget (time_budget=, CLI --time-budget)"
    if len(dataset) < MIN_SAMPLES:
        return f"distillation needs at least {MIN_SAMPLES} samples: half to train on, half to judge"
    if search.deadline - time.monotonic() < MIN_SECONDS + 2 * search.trial_cost():
        return "the time budget would run out first"
    return None
