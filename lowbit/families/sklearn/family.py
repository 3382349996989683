"""The scikit-learn family: estimators and pipelines, pickle/joblib/skops inputs and .lowbit files,
registered with lowbit.families.registry so `lowbit.load`, `compare` and `bench` reach them."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lowbit.evaluate.compare_models import Settings
from lowbit.evaluate.metrics import is_finite
from lowbit.families.registry import FAMILIES, Family
from lowbit.families.sklearn.compare_estimators import bench_estimator, compare_estimators, is_sklearn_model
from lowbit.families.sklearn.estimator_files import read_estimator
from lowbit.families.sklearn.lowbit_file import read_file


def _load(path: str | Path, **_: Any) -> Any:
    """A .lowbit file: the estimator (a torch skeleton or trust_code has no meaning here)."""
    return read_file(path)


def _compare(original: Any, quantized: Any, data: Any, settings: Settings, *, trust_pickle: bool = False,
             **_: Any):
    return compare_estimators(original, quantized, data, metric=settings.metric,
                              batch_sizes=settings.batch_sizes, max_drop=settings.max_drop,
                              relative=settings.relative, samples=settings.samples, runs=settings.runs,
                              threads=settings.threads, trust_pickle=trust_pickle)


def _bench(model: Any, batch_sizes: Sequence[int] = (1, 8), runs: int = 20, threads: int | None = None,
           data: Any = None, trust_pickle: bool = False, **_: Any) -> dict[str, Any]:
    return bench_estimator(model, data, batch_sizes, runs, threads, trust_pickle)


def _open_original(model: Any, trust_pickle: bool = False, **_: Any) -> Any:
    """An estimator, or one read from its file (a pickle only with `trust_pickle`)."""
    return read_estimator(model, trust_pickle) if isinstance(model, (str, os.PathLike)) else model


def _smoke_input(model: Any, _: Any) -> Any:
    """One row of zeros for an estimator fitted on a plain array (its feature count is known);
    None for one fitted on named columns, whose input types lowbit cannot guess."""
    width = getattr(model, "n_features_in_", None)
    if width is None or hasattr(model, "feature_names_in_"):
        return None
    return np.zeros((1, int(width)))


def _smoke_run(model: Any, batch: Any) -> bool:
    return is_finite(np.asarray(model.predict(batch)))


FAMILIES.add("scikit-learn", Family("scikit-learn", claims=is_sklearn_model, load=_load, compare=_compare,
                                    bench=_bench, open_original=_open_original, smoke_input=_smoke_input,
                                    smoke_run=_smoke_run))
