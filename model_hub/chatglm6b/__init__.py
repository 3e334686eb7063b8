"""Our ChatGLM-6B (THUDM/chatglm-6b) for transformers 5: config, model, tokenizer and the text layout.

`model_hub.chatglm6b.auto` registers the classes with transformers' Auto classes (model_hub does that as soon as
transformers is imported), so `AutoConfig`, `AutoModel`, `AutoModelForCausalLM` and `AutoTokenizer.from_pretrained(DIR)`
load an unmodified THUDM/chatglm-6b folder with `trust_remote_code` left off. As with the original's auto_map,
`AutoModel` gives the model WITH the LM head (`ChatGLMForConditionalGeneration`).

The package itself stays light (no torch): `model_hub.chatglm6b.text` serves the torch-free tokenization path, and
the names below are imported on first use.
"""
import importlib

_LAZY = {
    "ChatGLMConfig": "configuration",
    "ChatGLMModel": "modeling",
    "ChatGLMForConditionalGeneration": "modeling",
    "ChatGLMPreTrainedModel": "modeling",
    "ChatGLMTokenizer": "tokenization",
    "tiny_config": "auto",
    "TINY_SIZES": "auto",
}
__all__ = list(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
