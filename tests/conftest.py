import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def minilm():
    """The real all-MiniLM-L6-v2 (BERT) and its tokenizer, from the assets extra."""
    from lowbit.data import assets
    from lowbit.families import transformers as hf

    path = assets.minilm_path()
    return hf.load_pretrained(path), hf.load_tokenizer(path), path


@pytest.fixture(scope="session")
def wiki_sentences():
    from lowbit.data import assets

    return assets.wikipedia_sentences(256)


@pytest.fixture
def mlp():
    from tests.fixtures_models import tiny_mlp

    return tiny_mlp().eval()


@pytest.fixture
def mlp_batches():
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(8, 64, generator=generator) for _ in range(4)]
