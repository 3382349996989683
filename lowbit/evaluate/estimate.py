"""`lowbit.estimate`: parameter count and the size the weights would take at each precision.

These are estimates (bytes per parameter × parameters, plus scale overhead), not measurements, and
are labelled so wherever they are shown.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

# bytes per weight, including one fp32 scale (and zero point for int4) per channel or group
BYTES_PER_WEIGHT = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "int8": 1.0, "int4": 0.5 + 8 / 128}
QUANTIZABLE = (nn.Linear, nn.Conv2d, nn.Embedding)


@dataclass(frozen=True)
class Estimate:
    """Estimated model sizes in bytes per precision; `kind` is always "estimate"."""

    parameters: int
    quantizable_parameters: int
    bytes: dict[str, int] = field(default_factory=dict)
    kind: str = "estimate"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "parameters": self.parameters,
                "quantizable_parameters": self.quantizable_parameters, "bytes": dict(self.bytes)}


def estimate(model: nn.Module) -> Estimate:
    """Estimate sizes at fp32/fp16/int8/int4: quantizable weights at that precision, the rest fp32."""
    total = sum(p.numel() for p in model.parameters())
    weights = {
        module.weight.data_ptr(): module.weight.numel()
        for module in model.modules()
        if isinstance(module, QUANTIZABLE)
    }  # keyed by storage so tied weights count once
    quantizable = sum(weights.values())
    other = total - quantizable
    sizes = {name: int(quantizable * per_weight + other * 4) for name, per_weight in BYTES_PER_WEIGHT.items()}
    return Estimate(parameters=total, quantizable_parameters=quantizable, bytes=sizes)
