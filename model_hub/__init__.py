"""Everything about models: the vendored real tokenizer files, tokenizers that reproduce the originals' ids,
our ChatGLM-6B implementation (registered with transformers' Auto classes on import), the tiny-model factory,
weight converters and the one loader every recipe uses.

Importing `model_hub` registers the `chatglm` model type and our tokenizer classes, so that
`AutoConfig/AutoModel/AutoModelForCausalLM/AutoTokenizer.from_pretrained(DIR)` work offline with
`trust_remote_code` left off.
"""
import os

HUB_DIR = os.path.dirname(os.path.abspath(__file__))
TOKENIZER_FILES = os.path.join(HUB_DIR, "tokenizer_files")
REPO_DIR = os.path.dirname(HUB_DIR)
# Generated, git-ignored: tiny models and tokenizers too big to commit (GLM-4's tokenizer.json is 20 MB).
BUILD_DIR = os.environ.get("MODEL_HUB_BUILD_DIR", os.path.join(REPO_DIR, "build"))


def tokenizer_files(name: str) -> str:
    """Folder of the vendored real tokenizer/config files of `name` (e.g. "llama-7b")."""
    path = os.path.join(TOKENIZER_FILES, name)
    if not os.path.isdir(path):
        known = sorted(d for d in os.listdir(TOKENIZER_FILES) if os.path.isdir(os.path.join(TOKENIZER_FILES, d)))
        raise FileNotFoundError(f"no vendored tokenizer files for {name!r}; known: {', '.join(known)}")
    return path


# Registration with the Auto classes (each module registers itself on import).
from . import registration  # noqa: E402,F401
