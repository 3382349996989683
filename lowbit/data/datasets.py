"""Evaluation data files, read into a Dataset of texts or tensors with optional labels.

Formats: .jsonl (a "text" field, plus "label" for classification), .txt (one sample per line;
for a causal LM the lines are joined into running text), .csv (a "text" column, or numeric
feature columns, plus an optional "label" column), and tensors in .npy, .pt (loaded with
weights_only=True, no code runs) or .safetensors (an "input" tensor and optional "label").
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from lowbit.errors import LowbitError


class DataError(LowbitError):
    """An evaluation data file is missing, empty, malformed, or does not fit the model."""


@dataclass
class Dataset:
    """Either texts or a tensor of inputs, with optional labels (one per sample)."""

    texts: list[str] | None = None
    inputs: torch.Tensor | None = None
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.texts) if self.texts is not None else int(self.inputs.shape[0])

    def head(self, count: int) -> Dataset:
        return self.part(0, count)

    def part(self, start: int, stop: int | None = None) -> Dataset:
        """Samples `start` to `stop` (to the end when None), with their labels."""
        labels = None if self.labels is None else self.labels[start:stop]
        if self.texts is not None:
            return Dataset(texts=self.texts[start:stop], labels=labels)
        return Dataset(inputs=self.inputs[start:stop], labels=labels)


def _labels(values: list[Any]) -> np.ndarray | None:
    if all(v is None for v in values):
        return None
    if any(v is None for v in values):
        raise DataError("some samples have a label and some do not")
    return np.asarray(values)


def read_text(path: Path) -> str:
    """A data file's text, which must be UTF-8: a stray byte is an error, never a silent U+FFFD."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8 text (byte {error.start} cannot be decoded); "
                        "convert it to UTF-8") from None


def _read_jsonl(path: Path) -> Dataset:
    texts, labels = [], []
    for number, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            texts.append(str(record["text"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(f"{path}:{number} is not a JSON object with a \"text\" field") from None
        labels.append(record.get("label"))
    return Dataset(texts=texts, labels=_labels(labels))


def _read_csv(path: Path) -> Dataset:
    rows = list(csv.DictReader(io.StringIO(read_text(path), newline="")))
    if not rows:
        return Dataset(texts=[])
    labels = _labels([row.get("label") for row in rows]) if "label" in rows[0] else None
    if "text" in rows[0]:
        return Dataset(texts=[row["text"] for row in rows], labels=labels)
    features = [name for name in rows[0] if name != "label"]
    try:
        values = [[float(row[name]) for name in features] for row in rows]
    except (TypeError, ValueError):
        raise DataError(f"{path}: feature columns must be numeric (or give a \"text\" column)") from None
    return Dataset(inputs=torch.tensor(values, dtype=torch.float32), labels=labels)


def _read_tensors(path: Path) -> Dataset:
    try:
        if path.suffix == ".npy":
            tensors = {"input": torch.from_numpy(np.load(path, allow_pickle=False))}
        elif path.suffix == ".pt":
            loaded = torch.load(path, weights_only=True)
            tensors = loaded if isinstance(loaded, dict) else {"input": loaded}
        else:
            tensors = load_file(path)
    except Exception as error:  # noqa: BLE001 - np.load and torch.load fail in many ways on bad files
        raise DataError(f"{path} is not a readable tensor file: {type(error).__name__}: {error}") from None
    inputs = tensors.get("input", next(iter(tensors.values()), None))
    if not isinstance(inputs, torch.Tensor) or inputs.dim() == 0:
        raise DataError(f"{path} holds no input tensor (name it \"input\")")
    if inputs.dtype == torch.bool or inputs.is_complex():
        raise DataError(f"{path}: the input tensor holds {inputs.dtype}; give numbers")
    label = tensors.get("label", tensors.get("labels"))
    if label is not None and not isinstance(label, torch.Tensor):
        raise DataError(f"{path}: the labels must be a tensor")
    return Dataset(inputs=inputs, labels=None if label is None else label.numpy())


def read_dataset(path: str | Path) -> Dataset:
    """Read an evaluation data file (see module docstring); refuses a missing or empty one."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    readers = {".jsonl": _read_jsonl, ".csv": _read_csv, ".npy": _read_tensors,
               ".pt": _read_tensors, ".safetensors": _read_tensors}
    if path.suffix == ".txt":
        lines = [line for line in read_text(path).splitlines() if line.strip()]
        dataset = Dataset(texts=lines)
    elif path.suffix in readers:
        dataset = readers[path.suffix](path)
    else:
        raise DataError(f"unsupported data file {path}: use .jsonl, .txt, .csv, .npy, .pt or .safetensors")
    if len(dataset) == 0:
        raise DataError(f"{path} holds no samples")
    if dataset.labels is not None and len(dataset.labels) != len(dataset):
        raise DataError(f"{path} has {len(dataset.labels)} labels for {len(dataset)} samples")
    return dataset
