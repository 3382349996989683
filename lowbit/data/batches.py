"""Evaluation data into model inputs: a dataset from a file, texts or a tensor, and the batches a
task needs (tokenized text, language-model windows, tensors), one per batch size for timing."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from lowbit.data.datasets import DataError, Dataset, read_dataset
from lowbit.errors import LowbitError


def call_model(model: torch.nn.Module, batch: Any) -> Any:
    """Call a model on one batch: keyword inputs (a dict), positional ones (a tuple or list), or
    one tensor."""
    if isinstance(batch, dict) or hasattr(batch, "keys"):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def primary_tensor(output: Any) -> torch.Tensor:
    """The tensor a model's output is judged by: itself, its logits or last hidden state, or the
    first tensor of a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    for name in ("logits", "last_hidden_state"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise DataError(f"cannot find a tensor in the model's output ({type(output).__name__})")


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int = 128, pad_to_max: bool = False) -> dict:
    """One batch of token ids for `texts`: padded to the longest (or to `max_length`, for a
    fixed shape to time), truncated at `max_length`."""
    with _padding_token(tokenizer):
        return dict(tokenizer(list(texts), padding="max_length" if pad_to_max else True, truncation=True,
                              max_length=max_length, return_tensors="pt"))


@contextmanager
def _padding_token(tokenizer: Any) -> Iterator[None]:
    """Causal LM tokenizers (Llama's, GPT-2's) often have no padding token: their end-of-text
    token pads instead, hidden by the attention mask; the tokenizer is left as it was."""
    if getattr(tokenizer, "pad_token", "") is not None or getattr(tokenizer, "eos_token", None) is None:
        yield
        return
    tokenizer.pad_token = tokenizer.eos_token
    try:
        yield
    finally:
        tokenizer.pad_token = None


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


def text_batches(tokenizer: Any, texts: list[str], batch_size: int, max_length: int) -> list[dict]:
    """Tokenized batches of `batch_size` texts, padded to the longest, truncated at max_length."""
    return [tokenize(tokenizer, texts[i : i + batch_size], max_length)
            for i in range(0, len(texts), batch_size)]


def language_model_windows(
    tokenizer: Any, texts: list[str], context: int, max_tokens: int | None = None,
) -> list[dict]:
    """Sliding windows over the running text for perplexity: `context` tokens, stride context/2.

    Each window scores only the tokens the previous window did not (labels -100 elsewhere), so
    every token is predicted once, with at least half a window of context after the first.
    """
    ids = tokenizer("\n\n".join(texts), return_tensors="pt")["input_ids"][0]
    if max_tokens:
        ids = ids[:max_tokens]
    if ids.numel() < 2:
        raise DataError("the text holds fewer than 2 tokens; perplexity needs more")
    stride, windows, scored_until = max(1, context // 2), [], 0
    for start in range(0, max(1, ids.numel() - 1), stride):
        window = ids[start : start + context]
        labels = window.clone()
        labels[: max(0, scored_until - start)] = -100
        windows.append({"input_ids": window[None], "attention_mask": torch.ones_like(window)[None],
                        "labels": labels[None]})
        scored_until = start + window.numel()
        if scored_until >= ids.numel():
            break
    return windows


def tensor_batches(inputs: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return list(torch.split(inputs, batch_size))


def training_inputs(dataset: Dataset, batch_size: int) -> list[str] | list[torch.Tensor]:
    """What lowbit.distill trains on: the texts as they are (it tokenizes them), or the inputs
    in batches of `batch_size`."""
    return dataset.texts if dataset.texts is not None else tensor_batches(dataset.inputs, batch_size)


def calibration_batches(
    path: str | Path, tokenizer: Any = None, batch_size: int = 8, max_length: int = 128
) -> list[Any]:
    """Calibration batches from a data file: tokenized text for a transformers model, else tensors."""
    dataset = read_dataset(path)
    if dataset.texts is not None:
        if tokenizer is None:
            raise DataError("text calibration data needs a model with a tokenizer")
        return text_batches(tokenizer, dataset.texts, batch_size, max_length)
    return tensor_batches(dataset.inputs, batch_size)
