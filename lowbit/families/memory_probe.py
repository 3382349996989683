"""Run as `python -m lowbit.families.memory_probe MODEL INPUTS.safetensors [--trust-code]`:
loads one model (any source lowbit opens) in this fresh process, runs one batch, and prints one
JSON line with the load time and peak RSS (lowbit.evaluate.memory)."""

from __future__ import annotations

import contextlib
import json
import sys


def main(argv: list[str]) -> None:
    model_spec, inputs_path = argv[0], argv[1]
    trust_code = "--trust-code" in argv[2:]  # the caller's own choice, passed on
    from safetensors.torch import load_file

    from lowbit.evaluate.memory import measure_load
    from lowbit.families.torch_folders import load_any

    with contextlib.suppress(ImportError):  # import before the clock: time the model, not Python
        import transformers  # noqa: F401
    inputs = load_file(inputs_path)
    print(json.dumps(measure_load(lambda: load_any(model_spec, trust_code=trust_code), inputs)))


if __name__ == "__main__":
    main(sys.argv[1:])
