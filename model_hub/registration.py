"""Register our model and tokenizer classes with transformers' Auto classes (imported by model_hub/__init__)."""
import importlib

# Each module registers its classes at import time; a module still under construction is skipped quietly
# only if it does not exist yet (any other import error is a real bug and propagates).
for _module in ("model_hub.chatglm6b", "model_hub.llama_tokenizer", "model_hub.glm4_tokenizer"):
    try:
        importlib.import_module(_module)
    except ModuleNotFoundError as exc:
        if exc.name != _module:
            raise
