"""Forward hooks on named modules, removed when the block ends: how calibration records activation
ranges and how per-layer error captures each layer's output."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from torch import nn

Hook = Callable[[nn.Module, tuple, object], None]


@contextmanager
def forward_hooks(model: nn.Module, names: Iterable[str], make_hook: Callable[[str], Hook]) -> Iterator[None]:
    """Register `make_hook(name)` on every module of `model` named in `names` (missing names are
    skipped) for the duration of the block."""
    wanted = set(names)
    handles = [module.register_forward_hook(make_hook(name))
               for name, module in model.named_modules() if name in wanted]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
