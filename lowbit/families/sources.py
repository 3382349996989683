"""Where a source model comes from: a transformers folder, or `package.module:factory` + weights."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from lowbit.core.quantize import check_finite
from lowbit.errors import ModelLoadError, QuantizationError
from lowbit.families import transformers as hf


def resolve_factory(spec: str) -> Callable[[], nn.Module]:
    """Import `package.module:factory` and return the callable."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ModelLoadError(f"{spec!r} is not a factory spec; write it as package.module:factory")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ModelLoadError(f"cannot import {module_name!r} for {spec!r}: {error}") from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ModelLoadError(f"{module_name!r} has no callable {attribute!r}")
    return factory


def build_from_factory(spec: str, weights: str | Path | None = None) -> nn.Module:
    """Call the factory; load a safetensors weights file into the result when one is given."""
    try:
        model = resolve_factory(spec)()
    except ModelLoadError:
        raise
    except Exception as error:
        raise ModelLoadError(f"the factory {spec!r} failed: {error}") from error
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"the factory {spec!r} returned {type(model).__name__}, not an nn.Module")
    if weights is not None:
        load_weights(model, weights)
    model.lowbit_factory = spec
    return model.eval()


def load_weights(model: nn.Module, weights: str | Path) -> None:
    """Load a safetensors state dict (never a pickle) into `model`, strictly."""
    path = Path(weights)
    if not path.is_file():
        raise ModelLoadError(f"weights file {path} does not exist")
    if path.suffix != ".safetensors":
        raise ModelLoadError(f"{path} is not a .safetensors file; lowbit loads no pickled weights")
    try:
        state = load_file(path)
        model.load_state_dict(state, strict=True)
    except (SafetensorError, OSError) as error:
        raise ModelLoadError(f"{path} is corrupt or truncated: {error}") from None
    except RuntimeError as error:
        raise ModelLoadError(f"{path} does not fit the model: {error}") from None


def check_weights_finite(model: nn.Module) -> None:
    """Refuse a model with NaN/Inf parameters before any work is done on it."""
    for name, parameter in model.named_parameters():
        try:
            check_finite(parameter, f"parameter {name!r}")
        except QuantizationError as error:
            raise ModelLoadError(str(error)) from None


def load_source(source: str | Path, weights: str | Path | None = None) -> nn.Module:
    """A float model from a transformers folder or a `package.module:factory` spec."""
    text = str(source)
    if Path(text).exists():
        if not Path(text).is_dir():
            raise ModelLoadError(f"{text} is a file; pass a transformers folder or package.module:factory")
        model = hf.load_pretrained(text)
    elif ":" in text and not text.startswith(("/", ".")):
        model = build_from_factory(text, weights)
    else:
        raise ModelLoadError(
            f"{text} does not exist; pass a transformers folder or package.module:factory"
        )
    check_weights_finite(model)
    return model
