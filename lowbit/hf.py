"""Hugging Face transformers: load a model folder, save a quantized one with config and tokenizer,
rebuild it at load time, and turn text into model inputs and sentence embeddings."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.errors import ModelLoadError
from lowbit.evaluate.tasks import mean_pooled_embedding

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
)


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ModelLoadError(
            "transformers is not installed; install lowbit with the hf extra: pip install 'lowbit[hf]'"
        ) from None
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return transformers


def is_transformers_model(model: nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model, "save_pretrained")


def is_transformers_folder(path: str | Path) -> bool:
    return (Path(path) / "config.json").is_file()


def _model_class(config: Any, class_name: str | None = None):
    transformers = _transformers()
    names = [class_name] if class_name else list(getattr(config, "architectures", None) or [])
    for name in names:
        if name and hasattr(transformers, name):
            return getattr(transformers, name)
    return transformers.AutoModel


def load_pretrained(path: str | Path) -> nn.Module:
    """Load a transformers folder (config.json + weights) on CPU in float32, offline."""
    transformers = _transformers()
    folder = Path(path)
    if not is_transformers_folder(folder):
        raise ModelLoadError(f"{folder} is not a transformers model folder (no config.json)")
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        model_class = _model_class(config)
        model = model_class.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    except Exception as error:
        raise ModelLoadError(f"cannot load the transformers model in {folder}: {error}") from error
    return model.eval()


def load_tokenizer(path: str | Path):
    """The tokenizer saved beside a model, or None when the folder has none."""
    transformers = _transformers()
    try:
        return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception:
        return None


def describe(model: nn.Module) -> dict[str, Any]:
    """What the manifest records to rebuild this model: its class and source folder."""
    return {"kind": "transformers", "class": type(model).__name__,
            "source_path": str(getattr(model.config, "_name_or_path", "") or "")}


def write_files(model: nn.Module, quantization_config: dict[str, Any]):
    """A writer that puts config.json (with a quantization_config entry) and tokenizer files in
    the folder being saved."""

    def write(folder: Path) -> None:
        config = model.config.to_dict()
        config["quantization_config"] = {"quant_method": "lowbit", **quantization_config}
        (folder / "config.json").write_text(json.dumps(config, indent=2, default=str))
        source = Path(describe(model)["source_path"])
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, folder / name)

    return write


def build_skeleton(folder: str | Path, class_name: str, device: str = "cpu") -> nn.Module:
    """A model of the saved architecture from the folder's config.json alone, its tensors left
    uninitialised on `device` ("meta": no memory at all, for loading saved tensors into)."""
    transformers = _transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model_class = _model_class(config, class_name)
        with torch.device(device):
            model = model_class(config)
    except Exception as error:
        raise ModelLoadError(f"cannot rebuild the transformers model in {folder}: {error}") from error
    return model.eval()


def tokenize(tokenizer, texts: Sequence[str], max_length: int = 128) -> dict[str, torch.Tensor]:
    return dict(tokenizer(list(texts), padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt"))


def embed(model: nn.Module, tokenizer, texts: Sequence[str], batch_size: int = 1) -> torch.Tensor:
    """Mean-pooled sentence embeddings of `texts`, `batch_size` sentences per forward call."""
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = tokenize(tokenizer, texts[start : start + batch_size])
            chunks.append(mean_pooled_embedding(model, batch))
    return torch.cat(chunks)
