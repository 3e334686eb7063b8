"""Shared test setup: offline, deterministic, few threads (2 cores, maybe shared with a parallel worker)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(REPO, "tests", "golden")


@pytest.fixture(scope="session")
def golden_dir():
    return GOLDEN


@pytest.fixture(scope="session")
def glm4_tokenizer():
    """The real GLM-4-9B-chat tokenizer (built once into build/tokenizers by model_hub.glm4.tokenizer)."""
    from model_hub.glm4.tokenizer import load_glm4_tokenizer

    return load_glm4_tokenizer()
