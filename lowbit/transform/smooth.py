"""SmoothQuant: move activation outliers into the weights before W8A8 quantization.

A few input channels of an LLM's Linears carry activations tens of times larger than the rest,
so one int8 scale per tensor rounds the rest away. For a Linear fed by a module whose output
channels can be scaled exactly (a norm's weight, or another Linear's rows), dividing channel j
there by s_j and multiplying the Linear's weight column j by s_j leaves the float model's output
unchanged and evens out the activations: s_j = max|x_j|^α / max|W_j|^(1-α) (Xiao et al., 2023),
max|x_j| measured on calibration batches.

Pairs (Llama-style decoders: Llama, Mistral, Qwen2 name their modules alike):
- `input_layernorm` → `self_attn.{q,k,v}_proj` (the norm's output feeds only them);
- `post_attention_layernorm` → `mlp.{gate,up}_proj`;
- `mlp.up_proj` → `mlp.down_proj` (down reads act(gate) · up, linear in up's rows).
A post-norm encoder (BERT) adds its norm's output to the residual too, so it has no pair here.
The smoothed float model is checked against the original on the first batch; a mismatch is an
error, never a silently different model.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lowbit.data.batches import call_model, primary_tensor
from lowbit.errors import QuantizationError

Pair = tuple[str, list[str]]  # (the module whose output channels scale, the Linears reading them)
PAIRS = (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
         ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
         ("mlp.up_proj", ("mlp.down_proj",)))
TOLERANCE = 1e-3  # relative: the smoothed float model must give the original's outputs


def smoothing_pairs(model: nn.Module) -> list[Pair]:
    """Every (scaled module, Linears) pair of the model's decoder layers (see the module docstring)."""
    modules = dict(model.named_modules())
    pairs = []
    for name in modules:
        for source, readers in PAIRS:
            names = [f"{name}.{reader}" for reader in readers]
            if f"{name}.{source}" in modules and all(isinstance(modules.get(n), nn.Linear) for n in names):
                pairs.append((f"{name}.{source}", names))
    return pairs


def input_maxima(model: nn.Module, names: Iterable[str], batches: Iterable[Any]) -> dict[str, torch.Tensor]:
    """Per input channel, the largest |activation| each named Linear reads over `batches`."""
    maxima: dict[str, torch.Tensor] = {}

    def record(name: str):
        def hook(_: nn.Module, inputs: tuple) -> None:
            x = inputs[0].detach().abs().reshape(-1, inputs[0].shape[-1]).amax(0).float()
            maxima[name] = torch.maximum(maxima[name], x) if name in maxima else x
        return hook

    handles = [model.get_submodule(name).register_forward_pre_hook(record(name)) for name in names]
    try:
        with torch.inference_mode():
            for batch in batches:
                call_model(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return maxima


def smooth(model: nn.Module, batches: list[Any], alpha: float) -> list[Pair]:
    """Smooth `model` in place (see the module docstring); returns the pairs it scaled."""
    pairs = smoothing_pairs(model)
    if not pairs:
        raise QuantizationError(f"SmoothQuant found no norm → Linear pairs it can scale exactly in "
                                f"{type(model).__name__} (it knows Llama-style decoders); drop `smoothing`")
    if not batches:
        raise QuantizationError("SmoothQuant measures activations: pass calibration=[batch, ...]")
    before = _outputs(model, batches[0])
    maxima = input_maxima(model, [name for _, readers in pairs for name in readers], batches)
    with torch.no_grad():
        for source, readers in pairs:
            fold_scale(model, source, readers, _smoothing_scale(model, readers, maxima, alpha))
    after = _outputs(model, batches[0])
    error = float((after - before).norm() / before.norm().clamp(min=1e-12))
    if not error <= TOLERANCE:
        raise QuantizationError(f"SmoothQuant changed the float model's output by {error:.2g} (relative); "
                                "this architecture does not fit its pairs")
    return pairs


def _smoothing_scale(model: nn.Module, readers: list[str], maxima: dict[str, torch.Tensor],
                     alpha: float) -> torch.Tensor:
    """s = max|x|^α / max|W|^(1-α) per input channel of `readers`."""
    linears = [model.get_submodule(name) for name in readers]
    activation = torch.stack([maxima[name] for name in readers]).amax(0)
    weight = torch.stack([linear.weight.detach().abs().amax(0).float() for linear in linears]).amax(0)
    return (activation.clamp(min=1e-5) ** alpha / weight.clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5)


def fold_scale(model: nn.Module, source: str, readers: list[str], scale: torch.Tensor) -> None:
    """Divide `source`'s output channels by `scale` and multiply the columns of the Linears
    `readers` by it: the same float model, its activations between them divided."""
    linears = [model.get_submodule(name) for name in readers]
    scaled = model.get_submodule(source)
    if isinstance(scaled, nn.Linear):  # its output rows (and bias) divide
        scaled.weight.div_(scale[:, None].to(scaled.weight.dtype))
        if scaled.bias is not None:
            scaled.bias.div_(scale.to(scaled.bias.dtype))
    else:  # a norm's elementwise weight (and bias)
        scaled.weight.div_(scale.to(scaled.weight.dtype))
        if getattr(scaled, "bias", None) is not None:
            scaled.bias.div_(scale.to(scaled.bias.dtype))
    for linear in linears:
        linear.weight.mul_(scale.to(linear.weight.dtype))


def _outputs(model: nn.Module, batch: Any) -> torch.Tensor:
    with torch.inference_mode():
        return primary_tensor(call_model(model, batch)).float()
