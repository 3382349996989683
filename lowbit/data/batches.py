"""Evaluation data into model inputs: a dataset from a file, texts or a tensor, and the batches a
task needs (tokenized text, language-model windows, tensors), one per batch size for timing."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from lowbit.data.datasets import Dataset, language_model_windows, read_dataset, tensor_batches, text_batches
from lowbit.errors import LowbitError


def as_dataset(data: Any) -> Dataset:
    if isinstance(data, Dataset):
        return data
    if isinstance(data, (str, os.PathLike)):
        return read_dataset(data)
    if isinstance(data, torch.Tensor):
        return Dataset(inputs=data)
    if isinstance(data, Sequence) and data and all(isinstance(t, str) for t in data):
        return Dataset(texts=list(data))
    raise LowbitError("data must be a file path, a list of texts, a tensor, or a lowbit Dataset")


def task_batches(dataset: Dataset, kind: str, tokenizer: Any, batch_size: int, seq_len: int) -> list[Any]:
    if dataset.texts is None:
        return tensor_batches(dataset.inputs, batch_size)
    if tokenizer is None:
        raise LowbitError("text data needs a tokenizer: compare transformers folders, or pass tokenizer=")
    if kind == "causal_lm":
        return language_model_windows(tokenizer, dataset.texts, seq_len)
    return text_batches(tokenizer, dataset.texts, batch_size, seq_len)


def inputs_per_batch_size(dataset: Dataset, batch_sizes: Iterable[int],
                          text_batch: Callable[[list[str], int], Any]) -> dict[str, Any]:
    """One model input per batch size, from the first samples (`text_batch` turns texts into one)."""
    inputs = {}
    for size in batch_sizes:
        head = dataset.head(size)
        if len(head) < size:
            raise LowbitError(f"batch size {size} needs at least {size} samples; the data has {len(head)}")
        inputs[str(size)] = head.inputs if head.texts is None else text_batch(head.texts, size)
    return inputs


def speed_inputs(dataset: Dataset, kind: str, tokenizer: Any, batch_sizes: Iterable[int],
                 seq_len: int) -> dict[str, Any]:
    """The input timed at each batch size: a language-model window repeated, or the first texts."""
    if kind == "causal_lm" and dataset.texts is not None:
        window = language_model_windows(tokenizer, dataset.texts, seq_len)[0]
        return inputs_per_batch_size(dataset, batch_sizes, lambda texts, size: {
            k: v.repeat(size, 1) for k, v in window.items() if k != "labels"})
    return inputs_per_batch_size(dataset, batch_sizes,
                                 lambda texts, size: text_batches(tokenizer, texts, size, seq_len)[0])
