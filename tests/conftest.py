import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs a worker per core: one thread each
    torch.set_num_threads(1)
    # xdist's workers inherit COLUMNS=80, which fixes lowbit.cli's console at 80 columns when it is
    # made; without it the console follows each test's own COLUMNS, as in a serial run
    os.environ.pop("COLUMNS", None)


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
