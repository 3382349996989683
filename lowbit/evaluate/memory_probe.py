"""Measure, in a fresh process, what loading and running one model costs: load time and peak RSS.

Run as `python -m lowbit.evaluate.memory_probe MODEL INPUTS.safetensors [--trust-code]`; prints one JSON
line. Each model is probed in its own process so two models never share one process's peak.
"""

from __future__ import annotations

import contextlib
import json
import resource
import sys
import time

import torch


def _peak_rss_bytes() -> int:
    """The process's RSS high-water mark. VmHWM belongs to this program image; getrusage's
    ru_maxrss survives exec and would report the parent's peak when that was higher."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def main(argv: list[str]) -> None:
    model_spec, inputs_path = argv[0], argv[1]
    trust_code = "--trust-code" in argv[2:]  # the caller's own choice, passed on
    from safetensors.torch import load_file

    from lowbit.families.loading import load_any

    with contextlib.suppress(ImportError):  # import before the clock: time the model, not Python
        import transformers  # noqa: F401
    inputs = load_file(inputs_path)
    baseline = _peak_rss_bytes()
    start = time.perf_counter()
    model = load_any(model_spec, trust_code=trust_code)
    load_seconds = time.perf_counter() - start
    with torch.inference_mode():
        if set(inputs) == {"input"}:
            model(inputs["input"])
        else:
            model(**inputs)
    print(json.dumps({"load_seconds": load_seconds, "peak_rss_bytes": _peak_rss_bytes(),
                      "baseline_rss_bytes": baseline}))


if __name__ == "__main__":
    main(sys.argv[1:])
