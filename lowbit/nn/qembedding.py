"""QEmbedding: an embedding table stored in int8 or int4; only the looked-up rows are dequantized."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.core import QuantizedTensor
from lowbit.core.quantize import check_finite
from lowbit.nn.qweight import QuantizedWeightMixin
from lowbit.nn.registry import QModuleKind, register_qmodule
from lowbit.nn.spec import LayerSpec


class QEmbedding(QuantizedWeightMixin, nn.Module):
    """Drop-in replacement for `nn.Embedding` with weight-only int8 (per row) or int4 (per group)."""

    kind = "embedding"

    def __init__(self, num_embeddings: int, embedding_dim: int, spec: LayerSpec,
                 padding_idx: int | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx = padding_idx
        self._init_weight_buffers(spec, (num_embeddings, embedding_dim))

    @classmethod
    def from_float(cls, embedding: nn.Embedding, spec: LayerSpec,
                   rounded: QuantizedTensor | None = None) -> QEmbedding:
        """Quantize a float Embedding (its table as `rounded` by an algorithm, else round-to-nearest)."""
        check_finite(embedding.weight, "embedding weight")
        module = cls(embedding.num_embeddings, embedding.embedding_dim, spec, embedding.padding_idx)
        module._store_weight(embedding.weight.detach().float(), rounded)
        module.spec = spec.with_kernels({"all": "row_gather"})
        return module

    def kernel_problem(self) -> str | None:
        if self.spec.scheme != "weight_only" or self.spec.kernels not in ({}, {"all": "row_gather"}):
            return f"an embedding is weight-only and gathers rows, not {self.spec.scheme} {self.spec.kernels}"
        return None

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        rows = self.quantized_weight()
        gathered = F.embedding(indices, rows.data).float()
        if rows.scale is None:
            return gathered
        scale = F.embedding(indices, self.weight_scale.reshape(self.num_embeddings, -1))
        zero_point = getattr(self, "weight_zero_point", None)
        groups = scale.shape[-1]
        gathered = gathered.reshape(*indices.shape, groups, -1)
        if zero_point is not None:
            zero_point = F.embedding(indices, zero_point.reshape(self.num_embeddings, -1))
            gathered = gathered - zero_point.unsqueeze(-1).float()
        gathered = gathered * scale.unsqueeze(-1)
        if rows.minimum is not None:  # q * scale + minimum
            minimum = F.embedding(indices, rows.minimum.reshape(self.num_embeddings, -1))
            gathered = gathered + minimum.unsqueeze(-1)
        return gathered.reshape(*indices.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, weight={self.spec.weight}, "
            f"granularity={self.spec.granularity}"
        )


register_qmodule(QModuleKind(
    "embedding", QEmbedding, replaces=lambda module: type(module) is nn.Embedding,
    build=lambda module, spec, ranges: QEmbedding.from_float(module, spec, ranges.get("weight")),
    empty=lambda module, spec: QEmbedding(module.num_embeddings, module.embedding_dim, spec,
                                          module.padding_idx)))
