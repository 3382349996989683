"""Per-layer error: each quantized module's output against the original module's, same inputs.

Both models run the same batches; forward hooks capture the output of every quantized module and
of the module with the same name in the original, and SQNR is computed per module. Errors
accumulate, so a module's input already carries the error of the modules before it: the ranking
shows where the error stands, worst first.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lowbit.data.batches import call_model
from lowbit.evaluate.metrics import sqnr_db
from lowbit.nn.hooks import forward_hooks


def _capture(model: nn.Module, names: set[str], batches: list[Any]):
    """Flattened outputs of the named modules over all batches, and the rows of their first input."""
    outputs: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    input_rows: dict[str, int] = {}

    def hook_for(name):
        def hook(module, args, output):
            outputs[name].append(output.detach().float().reshape(-1))
            if isinstance(args[0], torch.Tensor) and args[0].dim() > 1:
                input_rows.setdefault(name, args[0].numel() // args[0].shape[-1])

        return hook

    with forward_hooks(model, names, hook_for), torch.inference_mode():
        for batch in batches:
            call_model(model, batch)
    return outputs, input_rows


def layer_errors(
    original: nn.Module, quantized: nn.Module, batches: Iterable[Any], quantized_names: Iterable[str],
) -> list[dict[str, Any]]:
    """SQNR (dB) of every quantized module's output, worst first, with scheme and kernel."""
    batches = list(batches)
    names = set(quantized_names)
    reference, _ = _capture(original, names, batches)
    candidate, input_rows = _capture(quantized, names, batches)
    modules = dict(quantized.named_modules())
    rows = []
    for name in names:
        if not reference[name] or not candidate[name]:
            continue
        ref, cand = torch.cat(reference[name]), torch.cat(candidate[name])
        if ref.shape != cand.shape:
            continue
        spec = modules[name].spec
        rows.append({"name": name, "sqnr_db": sqnr_db(ref, cand), "scheme": spec.scheme,
                     "weight": spec.weight, "granularity": spec.granularity,
                     "kernel": spec.kernel_for(input_rows.get(name, 1))})
    return sorted(rows, key=lambda row: row["sqnr_db"])
