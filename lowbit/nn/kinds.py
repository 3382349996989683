"""Which float modules lowbit can replace exactly, and as what kind."""

from __future__ import annotations

from torch import nn

MODULE_KINDS = {nn.Linear: "linear", nn.Conv2d: "conv", nn.Embedding: "embedding"}


def module_kind(module: nn.Module) -> str | None:
    """"linear", "conv" or "embedding" for modules lowbit can replace exactly, else None.

    Subclasses are not replaced (their forward may differ), except the static-same-padding
    Conv2d of EfficientNet/timm, which QConv2d reproduces.
    """
    kind = MODULE_KINDS.get(type(module))
    if kind is None and isinstance(module, nn.Conv2d) and isinstance(
        getattr(module, "static_padding", None), nn.Module
    ):
        kind = "conv"
    if kind == "conv" and module.padding_mode != "zeros":
        return None
    return kind
