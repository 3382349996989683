"""What loading and running one model costs in a process: load time and peak RSS.

`measure_load` is run in a fresh process per model (lowbit.families.memory_probe), so two models
never share one process's peak.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import resource
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lowbit.core.timing import timed
from lowbit.data.batches import call_model


def _status_bytes(field: str) -> int | None:
    """A `field` of /proc/self/status (kB) in bytes, or None off Linux."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """The process's RSS high-water mark. VmHWM belongs to this program image; getrusage's
    ru_maxrss survives exec and would report the parent's peak when that was higher."""
    peak = _status_bytes("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int | None:
    """The process's resident set size now (None off Linux)."""
    return _status_bytes("VmRSS")


def measure_load(load: Callable[[], nn.Module], inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Seconds `load` takes, then the peak RSS after one call on `inputs` ({"input": x} or the
    keyword inputs of a transformers model)."""
    baseline = peak_rss_bytes()
    model, load_seconds = timed(load)
    with torch.inference_mode():
        call_model(model, inputs["input"] if set(inputs) == {"input"} else inputs)
    return {"load_seconds": load_seconds, "peak_rss_bytes": peak_rss_bytes(), "baseline_rss_bytes": baseline}


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def release_freed_memory() -> None:
    """Hand the memory the C allocator holds for freed tensors back to the system (glibc's
    `malloc_trim`; nothing elsewhere). Quantizing frees a float weight per module; glibc keeps
    most of it, so without this the process's RSS grows block after block of GPTQ."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
