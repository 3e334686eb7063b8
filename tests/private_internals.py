"""Where production code touches a third-party library's private names (an `_`-prefixed attribute), found by reading
the source (AST), and the override points allowed outside the layers' patches modules. Shared by
tests/test_layers.py (the rule) and tests/test_patches.py (each allowed internal still exists)."""
import ast
import importlib
import inspect
import os
import re

from conftest import REPO

LIBRARIES = ("transformers", "deepspeed", "uvicorn", "accelerate", "trl", "peft", "huggingface_hub", "datasets",
             "tqdm", "torch", "gradio", "fastapi", "starlette", "safetensors", "bitsandbytes")
FOLDERS = ("tuning", "model_hub", "serving", "bench", "preference", "chatglm_lora", "llama_ner", "glm4_finetune")
PATCH_MODULES = ("tuning/patches.py", "model_hub/patches.py", "serving/patches.py")

# Allowed outside a patches module: hooks a subclass is meant to fill in (the library's own subclasses do, and its
# docs or model template say so) and the state a tokenizer implementation keeps in its base class.
# file → {private name: (the library class that has it, why)}; test_patches checks each still exists there.
_SLOW_TOKENIZER = "transformers.tokenization_python:PythonBackend"
_SENTENCEPIECE = "transformers.tokenization_utils_sentencepiece:SentencePieceBackend"
_GENERATION = "transformers.generation.utils:GenerationMixin"
ALLOWED = {
    "tuning/checkpoints.py": {
        "_get_train_sampler": ("transformers:Trainer", "Trainer docs: subclass and override for a custom sampler")},
    "model_hub/chatglm6b/modeling.py": {
        "_init_weights": ("transformers:PreTrainedModel", "the model template's weight-init hook")},
    "model_hub/chatglm6b/generation.py": {
        name: (_GENERATION, "generation hooks transformers' own models override (positions, masks, cache)")
        for name in ("_validate_model_kwargs", "_prepare_position_ids_for_generation",
                     "_expand_inputs_for_generation", "_update_model_kwargs_for_generation")},
    "model_hub/chatglm6b/tokenization.py": {
        **{name: (_SLOW_TOKENIZER, "the slow-tokenizer template: a subclass implements these")
           for name in ("_tokenize", "_convert_token_to_id", "_convert_id_to_token", "_decode")},
        "_pad": ("transformers:PreTrainedTokenizerBase", "the original ChatGLM-6B tokenizer's own padding (GLM mask)"),
        **{name: (_SLOW_TOKENIZER, "the added-token tables a tokenizer implementation fills")
           for name in ("_added_tokens_decoder", "_added_tokens_encoder")}},
    "model_hub/llama/tokenizer.py": {
        **{name: (_SENTENCEPIECE, "the sentencepiece tokenizer template: a subclass implements these")
           for name in ("_tokenize", "_decode", "_add_tokens")},
        **{name: (_SENTENCEPIECE, "the added-token and special-token tables a tokenizer implementation keeps")
           for name in ("_added_tokens_decoder", "_added_tokens_encoder", "_update_trie", "_special_tokens_map",
                        "_extra_special_tokens")}},
    "preference/trainers.py": {
        "_prepare_dataset": ("trl:DPOTrainer", "TRL 1.16's dataset step, replaced: our rows are token ids already")},
}
# checked on every class that has it
ALSO_ON = {("preference/trainers.py", "_prepare_dataset"): ("trl:KTOTrainer",)}


def third_party_names(tree) -> dict[str, str]:
    """name bound by an import of one of LIBRARIES → the dotted thing it names ("torch", "transformers:Trainer")."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in LIBRARIES:  # `import a.b as c` binds a.b; `import a.b` binds a
                    bound = alias.name if alias.asname else alias.name.split(".")[0]
                    names[alias.asname or bound] = bound
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] in LIBRARIES:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}:{alias.name}"
    return names


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _resolve(target: str):
    module, _, attr = target.partition(":")
    found = importlib.import_module(module)
    for part in filter(None, attr.split(".")):
        found = getattr(found, part)
    return found


def _base_target(base, names) -> str | None:
    parts = []
    while isinstance(base, ast.Attribute):
        parts.insert(0, base.attr)
        base = base.value
    if not isinstance(base, ast.Name) or base.id not in names:
        return None
    root = names[base.id]
    return root + (("." if ":" in root else ":") + ".".join(parts) if parts else "")


def _library_privates(cls) -> dict[str, str]:
    """Private names a library class and its library bases define or set on self → "module:Class" that does."""
    found = {}
    for klass in reversed(cls.__mro__):
        if klass.__module__.split(".")[0] not in LIBRARIES:
            continue
        owner = f"{klass.__module__}:{klass.__qualname__}"
        names = set(vars(klass))
        try:
            names |= set(re.findall(r"self\.(_\w+)", inspect.getsource(klass)))
        except (OSError, TypeError):
            pass
        found.update({name: owner for name in names if _private(name)})
    return found


def private_uses(path: str, tree) -> set[tuple[int, str, str]]:
    """(line, name, what) for each private third-party name `path` touches: an attribute of an imported library
    object, `super()._name`, and in a class with a library base a method overriding, or a `self._name` using, a
    private name of that base. (A mixin without a library base is seen through its `super()._name` calls only.)"""
    names, found = third_party_names(tree), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            if _base_target(node.value, names):
                found.add((node.lineno, node.attr, ast.unparse(node)))
            elif isinstance(node.value, ast.Call) and isinstance(node.value.func, ast.Name) \
                    and node.value.func.id == "super":
                found.add((node.lineno, node.attr, f"super().{node.attr}"))
        if not isinstance(node, ast.ClassDef):
            continue
        library = {}
        for base in filter(None, (_base_target(b, names) for b in node.bases)):
            library.update(_library_privates(_resolve(base)))
        for item in ast.walk(node):
            if isinstance(item, ast.FunctionDef) and item.name in library:
                found.add((item.lineno, item.name, f"overrides {library[item.name]}.{item.name}"))
            elif isinstance(item, ast.Attribute) and item.attr in library and isinstance(item.value, ast.Name) \
                    and item.value.id == "self":
                found.add((item.lineno, item.attr, f"self.{item.attr} of {library[item.attr]}"))
    return found


def production_files():
    for folder in FOLDERS:
        for root, _, files in os.walk(os.path.join(REPO, folder)):
            for name in sorted(files):
                if name.endswith(".py"):
                    path = os.path.join(root, name)
                    yield os.path.relpath(path, REPO), ast.parse(open(path, encoding="utf-8").read(), path)
