"""Everything that knows a model, one package per family (chatglm6b/, glm4/, llama/): tokenizers that reproduce the
originals' ids, prompt formats, masks, converters; `registry` (the one source of model facts), the loader every
recipe uses, the tiny-model factory, the memory estimator; the vendored real tokenizer files.

Importing `model_hub` registers the `chatglm` model type and our tokenizer classes with transformers' Auto classes,
so that `AutoConfig/AutoModel/AutoModelForCausalLM/AutoTokenizer.from_pretrained(DIR)` work offline with
`trust_remote_code` left off. The registration (transformers' public register API) runs as soon as transformers is
imported (at once if it already is; model_hub.patches.call_when_transformers_loads): light modules such as
`model_hub.chatglm6b.text` can then be used without paying for torch. The loader registers before every load.
"""
import importlib
import os

import tuning  # noqa: F401  (first: silences library lines no user can act on, before any model_hub module loads them)

from .patches import call_when_transformers_loads

HUB_DIR = os.path.dirname(os.path.abspath(__file__))
TOKENIZER_FILES = os.path.join(HUB_DIR, "tokenizer_files")
REPO_DIR = os.path.dirname(HUB_DIR)
# Generated, git-ignored: tiny models and tokenizers too big to commit (GLM-4's tokenizer.json is 20 MB).
BUILD_DIR = os.environ.get("MODEL_HUB_BUILD_DIR", os.path.join(REPO_DIR, "build"))

# Each module registers its classes with the Auto classes when imported.
_REGISTERING_MODULES = ("model_hub.chatglm6b.auto", "model_hub.llama.tokenizer")
_registered = False


def tokenizer_files(name: str) -> str:
    """Folder of the vendored real tokenizer/config files of `name` (e.g. "llama-7b")."""
    path = os.path.join(TOKENIZER_FILES, name)
    if not os.path.isdir(path):
        known = sorted(d for d in os.listdir(TOKENIZER_FILES) if os.path.isdir(os.path.join(TOKENIZER_FILES, d)))
        raise FileNotFoundError(f"no vendored tokenizer files for {name!r}; known: {', '.join(known)}")
    return path


def register_with_transformers() -> None:
    """Register our config, model and tokenizer classes with transformers' Auto classes (idempotent)."""
    global _registered
    if not _registered:
        _registered = True
        for module in _REGISTERING_MODULES:
            importlib.import_module(module)


call_when_transformers_loads(register_with_transformers, __name__)  # (model_hub.patches: why and how)
