"""LayerSpec: how one module is quantized — the unit recorded per module in lowbit.json."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

SCHEMES = ("weight_only", "dynamic", "static")


@dataclass(frozen=True)
class LayerSpec:
    """Scheme, weight type and granularity of one module, and the kernels chosen for it.

    `kernels` maps a row bucket (the most rows it serves, as text; "all" when one kernel serves every
    input) to a kernel name, chosen by measurement when the module is built and saved with it, so
    a reload runs the same code and gives the same outputs.
    """

    scheme: str
    weight: str
    granularity: str
    symmetric: bool
    activation: str | None = None
    kernels: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerSpec:
        return cls(**data)

    def with_kernels(self, kernels: dict[str, str]) -> LayerSpec:
        return replace(self, kernels=dict(kernels))
