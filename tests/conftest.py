"""Shared test setup: offline, deterministic, few threads (2 cores, maybe shared with a parallel worker)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")


@pytest.fixture(scope="session")
def golden_dir():
    return GOLDEN


@pytest.fixture(scope="session")
def glm4_tokenizer():
    """The real GLM-4-9B-chat tokenizer (built once into build/tokenizers by model_hub.glm4_tokenizer)."""
    from model_hub.glm4_tokenizer import load_glm4_tokenizer

    return load_glm4_tokenizer()


@pytest.fixture(scope="session")
def glm4_tool_call_model():
    """Folder of a tiny GLM-4 the glm4 recipe overfitted on one tool-call conversation (tests/serving_support.py);
    trained once into build/serving/glm4-tool-call, reused by later runs (serving and web-demo tests)."""
    from serving_support import glm4_tool_call_model as build

    from model_hub import BUILD_DIR

    return build(BUILD_DIR)
