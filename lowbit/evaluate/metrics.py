"""Quality metrics that compare a quantized model's outputs with the original's on the same inputs."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def mean_cosine(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """Mean cosine similarity of matching rows (e.g. sentence embeddings), 1.0 when identical."""
    return float(F.cosine_similarity(reference.float(), candidate.float(), dim=-1).mean())


def sqnr_db(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB; +inf when the outputs are identical."""
    noise = float((reference.double() - candidate.double()).pow(2).sum())
    signal = float(reference.double().pow(2).sum())
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)
