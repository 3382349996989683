"""sha256 digests of tensors and state dicts: how saved files and source models are identified."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's raw bytes (contiguous, as stored)."""
    data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(data.tobytes()).hexdigest()


def tensor_entry(tensor: torch.Tensor) -> tuple[str, str]:
    """(the tensor's dtype and shape, the sha256 of its bytes): what `state_dict_sha256` reads of it."""
    return f"{tensor.dtype}|{tuple(tensor.shape)}", tensor_sha256(tensor)


def digest_entries(entries: Iterable[tuple[str, str, str]]) -> str:
    """One sha256 over (name, `tensor_entry`) triples, in the order given."""
    digest = hashlib.sha256()
    for name, description, sha256 in entries:
        digest.update(f"{name}|{description}|".encode())
        digest.update(sha256.encode())
    return digest.hexdigest()


def state_dict_sha256(state: dict[str, torch.Tensor]) -> str:
    """One sha256 over every tensor's name, dtype, shape and bytes, in key order (tensors read one
    at a time, as lowbit.families.lazy_weights reads them, give the same digest)."""
    return digest_entries((name, *tensor_entry(state[name])) for name in sorted(state))
