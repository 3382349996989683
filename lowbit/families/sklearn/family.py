"""The scikit-learn family: estimators and pipelines, pickle/joblib/skops inputs and .lowbit files,
registered with lowbit.families.registry so `lowbit.load`, `compare` and `bench` reach them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lowbit.evaluate.compare_models import Settings
from lowbit.families.registry import FAMILIES, Family
from lowbit.families.sklearn.compare_estimators import bench_estimator, compare_estimators, is_sklearn_model
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


FAMILIES.add("scikit-learn", Family("scikit-learn", claims=is_sklearn_model, load=_load, compare=_compare,
                                    bench=_bench))
