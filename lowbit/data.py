"""User data files turned into model inputs: text (.txt, .jsonl) and tensors (.safetensors)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from lowbit import hf
from lowbit.errors import CalibrationError


def read_texts(path: str | Path) -> list[str]:
    """Samples from a .txt file (one per non-empty line) or a .jsonl file (a "text" field each)."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"data file {path} does not exist")
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(lines, 1):
            try:
                texts.append(str(json.loads(line)["text"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CalibrationError(
                    f"{path}:{number} is not a JSON object with a \"text\" field"
                ) from None
    else:
        texts = lines
    if not texts:
        raise CalibrationError(f"{path} holds no samples")
    return texts


def read_tensor_batches(path: str | Path, batch_size: int = 8) -> list[torch.Tensor]:
    """Batches along the first dimension of the single tensor (or the one named "input")."""
    path = Path(path)
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as error:
        raise CalibrationError(f"{path} is not a readable safetensors file: {error}") from None
    if "input" in tensors:
        tensor = tensors["input"]
    elif len(tensors) == 1:
        tensor = next(iter(tensors.values()))
    else:
        raise CalibrationError(f"{path} holds several tensors; name the inputs \"input\"")
    if tensor.dim() == 0 or tensor.shape[0] == 0:
        raise CalibrationError(f"{path} holds no samples")
    return list(torch.split(tensor, batch_size))


def calibration_batches(
    path: str | Path, tokenizer: Any = None, batch_size: int = 8, max_length: int = 128
) -> list[Any]:
    """Calibration batches from a data file: tokenized text for a transformers model, else tensors."""
    suffix = Path(path).suffix
    if suffix in (".txt", ".jsonl"):
        if tokenizer is None:
            raise CalibrationError("text calibration data needs a model with a tokenizer")
        texts = read_texts(path)
        return [hf.tokenize(tokenizer, texts[i : i + batch_size], max_length)
                for i in range(0, len(texts), batch_size)]
    if suffix == ".safetensors":
        return read_tensor_batches(path, batch_size)
    raise CalibrationError(f"unsupported data file {path}: use .txt, .jsonl or .safetensors")
