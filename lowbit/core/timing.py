"""The one way lowbit times code: wall-clock seconds of calls (`time.perf_counter`), for kernel
choice, latency measurement and load times alike."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

Result = TypeVar("Result")


def timed(call: Callable[[], Result]) -> tuple[Result, float]:
    """(what `call` returns, the seconds it took)."""
    start = time.perf_counter()
    result = call()
    return result, time.perf_counter() - start


def repeat_seconds(call: Callable[[], object], repeats: int, warmup: int = 0) -> list[float]:
    """Seconds of each of `repeats` calls, after `warmup` untimed ones."""
    for _ in range(warmup):
        call()
    return [timed(call)[1] for _ in range(repeats)]
