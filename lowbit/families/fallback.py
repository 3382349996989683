"""`lowbit.load(DST, fallback=ORIGINAL)`: a quantized model that cannot serve gives way to its
original instead of taking a service down.

The quantized model cannot serve when loading it raises (a corrupt or edited file, a runtime
that is not installed, a torch that cannot build it), when it loads only by swapping a kernel
this machine lacks for the slow reference, or when one batch through it raises or gives
non-finite outputs. Then the original is opened, the reason is logged (logger "lowbit") and
raised as a LowbitWarning, and the model returned says which it is: `lowbit_served` is
"quantized" or "original", `lowbit_fallback_reason` the reason or None, and `lowbit_smoke` what
the one-batch check found.

The batch is `smoke_input` when given, else one the family can make (token ids from the
tokenizer saved beside a text model, zeros of an ONNX graph's or an estimator's input shape).
When that batch fails on the original too, it proves nothing about quantization: the quantized
model is served, and the check is reported as inconclusive.
"""

from __future__ import annotations

import copy
import logging
import os
import warnings
from collections.abc import Callable
from typing import Any

from lowbit.errors import LowbitError, LowbitWarning, MissingKernelWarning
from lowbit.families.registry import Family, family_of

LOG = logging.getLogger("lowbit")
NO_INPUT = "no input to make one batch from (pass smoke_input=)"


def load_with_fallback(path: str | os.PathLike, original: Any, load: Callable[[], Any],
                       smoke_input: Any = None, trust_pickle: bool = False, trust_code: bool = False) -> Any:
    """`load()` (the quantized model at `path`), or `original` (a model, or a path or spec its
    family opens) when the quantized one cannot serve; see the module docstring."""
    family = family_of(path)
    model, reason = _load_checked(load)
    batch = None
    if model is not None:
        batch = smoke_input if smoke_input is not None else _made_input(family, model, path)
        reason = None if batch is None else _smoke_problem(family, model, batch)
    if reason is None:
        if batch is None:
            warnings.warn(f"{path} loaded, but lowbit has no input to run one batch through it: serving it "
                          "unchecked (pass smoke_input=)", LowbitWarning, stacklevel=3)
            return _label(model, "quantized", None, f"not run: {NO_INPUT}")
        return _label(model, "quantized", None, "passed")
    fallback = _open_original(family_of(original, path), original, trust_pickle, trust_code, path, reason)
    if model is not None and _smoke_problem(family, fallback, batch) is not None:
        _say(f"{path}: the one-batch check fails on the original too ({reason}), so it proves nothing: "
             "serving the quantized model unchecked")
        return _label(model, "quantized", None, f"inconclusive: it fails on the original too ({reason})")
    _say(f"{path} cannot serve ({reason}); serving the original {_name(original)} instead")
    return _label(fallback, "original", reason, "failed" if model is not None else "not run: it did not load")


def _say(message: str) -> None:
    """On the `lowbit` logger (for a service's logs) and as a LowbitWarning (for a person)."""
    LOG.warning(message)
    warnings.warn(message, LowbitWarning, stacklevel=4)


def _made_input(family: Family, model: Any, path: Any) -> Any:
    """The family's one batch for `model`, or None when it cannot make one."""
    try:
        return family.smoke_input(model, path)
    except Exception:  # noqa: BLE001 - no batch is "unchecked", said as such
        return None


def _load_checked(load: Callable[[], Any]) -> tuple[Any, str | None]:
    """(the loaded model, None), or (None, why it cannot serve). Other LowbitWarnings pass on."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model = load()
        except Exception as error:  # noqa: BLE001 - whatever stops a load is a reason to fall back
            return None, f"{type(error).__name__}: {error}"
    missing = [str(item.message) for item in caught if issubclass(item.category, MissingKernelWarning)]
    for item in caught:
        if not issubclass(item.category, MissingKernelWarning):
            warnings.warn_explicit(item.message, item.category, item.filename, item.lineno)
    if missing:
        return None, f"a kernel this machine lacks: {missing[0]}"
    return model, None


def _smoke_problem(family: Family, model: Any, batch: Any) -> str | None:
    """Why one batch through `model` failed (raised, or gave non-finite outputs), or None."""
    try:
        finite = family.smoke_run(model, batch)
    except Exception as error:  # noqa: BLE001 - any failure of the batch is the finding
        return f"one batch raised {type(error).__name__}: {str(error)[:200]}"
    return None if finite else "one batch gave non-finite outputs"


def _open_original(family: Family, original: Any, trust_pickle: bool, trust_code: bool, path: Any,
                   reason: str) -> Any:
    if not isinstance(original, (str, os.PathLike)):
        return copy.copy(original)  # labelled, not the caller's object: its weights are shared, not copied
    try:
        return family.open_original(original, trust_pickle=trust_pickle, trust_code=trust_code)
    except Exception as error:  # noqa: BLE001 - said with the first reason; nothing is left to serve
        raise LowbitError(f"{path} cannot serve ({reason}), and the original {_name(original)} cannot be "
                          f"opened either: {type(error).__name__}: {error}") from None


def _label(model: Any, served: str, reason: str | None, smoke: str) -> Any:
    model.lowbit_served = served
    model.lowbit_fallback_reason = reason
    model.lowbit_smoke = smoke
    return model


def _name(model: Any) -> str:
    return str(model) if isinstance(model, (str, os.PathLike)) else f"({type(model).__name__})"
