"""The layers stay layers: tuning/ names no model and imports no higher layer, model_hub/ imports no recipe, no
script edits sys.path (the project is installed), LoRA target names live in the registry only, and the light
ChatGLM-6B text path stays free of torch while `import model_hub` still registers our classes, and private names of
third-party libraries are touched in the layers' patches modules only."""
import ast
import os
import subprocess
import sys

import pytest

from conftest import REPO

RECIPES = ("chatglm_lora", "llama_ner", "glm4_finetune")
HIGHER = {"tuning": ("model_hub", "serving", "bench", "preference", *RECIPES),
          "model_hub": ("serving", "bench", "preference", *RECIPES),
          "serving": ("bench", "preference", *RECIPES),  # serving imports no recipe: prompt formats are model_hub data
          **{recipe: ("bench", "preference") for recipe in RECIPES}}  # nothing imports preference/


def python_files(folder: str):
    for root, _, files in os.walk(os.path.join(REPO, folder)):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                yield os.path.relpath(path, REPO), ast.parse(open(path, encoding="utf-8").read(), path)


def imported_modules(tree) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


@pytest.mark.parametrize("layer", sorted(HIGHER))
def test_a_layer_imports_only_the_layers_below(layer):
    wrong = [(path, module) for path, tree in python_files(layer) for module in imported_modules(tree)
             if module.split(".")[0] in HIGHER[layer]]
    assert not wrong, wrong


def test_no_script_edits_sys_path():
    edits = []
    for folder in ("tuning", "model_hub", "serving", "bench", "preference", *RECIPES):
        for path, tree in python_files(folder):
            for node in ast.walk(tree):
                if (isinstance(node, ast.Attribute) and node.attr in ("insert", "append")
                        and isinstance(node.value, ast.Attribute) and node.value.attr == "path"
                        and isinstance(node.value.value, ast.Name) and node.value.value.id == "sys"):
                    edits.append((path, node.lineno))
    assert not edits, edits


def test_lora_target_names_are_registry_data_only():
    from model_hub.registry import FAMILIES

    names = {name for family in FAMILIES.values() for name in family.lora_targets}
    found = []
    for folder in ("tuning", "serving", "bench", "preference", *RECIPES):
        for path, tree in python_files(folder):
            found += [(path, node.lineno, node.value) for node in ast.walk(tree)
                      if isinstance(node, ast.Constant) and node.value in names]
    assert not found, found


def test_tuning_names_no_model_family():
    words = ("chatglm", "glm4", "glm-4", "llama")
    found = [(path, node.lineno) for path, tree in python_files("tuning") for node in ast.walk(tree)
             if isinstance(node, ast.Constant) and isinstance(node.value, str)
             and any(word in node.value.lower() for word in words)]
    assert not found, found


def test_the_serving_engine_branches_on_registry_data_not_on_family_names():
    """Issue 30.6: how a family decodes from a cache (ChatGLM-6B's 2-D positions) and whether its P-tuning prefix is
    served are the registry's (decode_layout, serves_prefix); the engine, its KV batch and the loader name no family."""
    from model_hub.registry import FAMILIES

    files = {os.path.join("serving", name) for name in ("engine.py", "kv_batch.py", "loading.py", "sampling.py")}
    found = [(path, node.lineno, node.value) for path, tree in python_files("serving") if path in files
             for node in ast.walk(tree) if isinstance(node, ast.Constant) and node.value in FAMILIES]
    assert not found, found


def test_chatglm_text_path_is_torch_free_and_model_hub_still_registers():
    probe = ("import sys; import model_hub.chatglm6b.text; assert 'torch' not in sys.modules, 'torch imported'; "
             "from transformers import AutoConfig; import model_hub; "
             "config = AutoConfig.from_pretrained(model_hub.tokenizer_files('chatglm-6b')); "
             "print(type(config).__module__)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "model_hub.chatglm6b.configuration"


def test_model_hub_registers_when_transformers_came_first():
    probe = ("import transformers; from transformers import AutoTokenizer; import model_hub; "
             "print(type(AutoTokenizer.from_pretrained(model_hub.tokenizer_files('chatglm-6b'))).__name__)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ChatGLMTokenizer"


@pytest.mark.parametrize("first", ["model_hub.chatglm6b.generation", "model_hub.llama.tokenizer",
                                   "model_hub.glm4.tokenizer", "model_hub.loader"])
def test_a_model_hub_module_that_loads_transformers_first_still_registers(first):
    """The registration waits until that module is complete (it once met a half-initialised generation module)."""
    probe = (f"import {first}; from transformers import AutoTokenizer; import model_hub; "
             "print(type(AutoTokenizer.from_pretrained(model_hub.tokenizer_files('chatglm-6b'))).__name__)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ChatGLMTokenizer"


def test_one_adapter_loader():
    """Loading an adapter onto a base happens in model_hub.loader.load_adapted only (issue 30: five drifting copies
    were merged; a sixth would drift again)."""
    found = []
    for folder in ("tuning", "model_hub", "serving", "bench", "preference", *RECIPES):
        for path, tree in python_files(folder):
            found += [(path, node.lineno) for node in ast.walk(tree)
                      if isinstance(node, ast.Attribute) and node.attr == "from_pretrained"
                      and isinstance(node.value, ast.Name) and node.value.id.startswith("PeftModel")]
    assert [path for path, _ in found] == ["model_hub/loader.py"], found


def test_the_adapter_loader_takes_the_adapters_tokenizer_and_applies_the_family_hook(tmp_path):
    """One GLM-4 P-tuning v2 adapter: the recipes' load (family hook on: text positions from 0, as trained) and the
    engine's (hook off: the engine numbers positions itself) differ only there; both use the adapter's tokenizer."""
    import torch
    from peft import PrefixTuningConfig, get_peft_model

    from model_hub.loader import load_adapted, load_model_and_tokenizer

    base, tokenizer = load_model_and_tokenizer("tiny:glm-4-9b-chat", dtype="fp32")
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    get_peft_model(base, config).save_pretrained(tmp_path / "adapter")
    tokenizer.add_tokens(["<the-adapters-own-token>"])  # proof of which tokenizer was taken
    tokenizer.save_pretrained(tmp_path / "adapter")
    for hooks in (True, False):
        model, loaded_tokenizer = load_adapted("tiny:glm-4-9b-chat", str(tmp_path / "adapter"), family_hooks=hooks)
        assert "<the-adapters-own-token>" in loaded_tokenizer.get_vocab()
        assert not model.training and isinstance(model.get_base_model(), torch.nn.Module)
        assert getattr(model.base_model, "_text_positions_from_zero", False) is hooks


def import_graph() -> dict[str, set[str]]:
    """module → the project modules it imports (top level and inside functions; `from pkg import mod` → pkg.mod)."""
    modules = {}
    for folder in ("tuning", "model_hub", "serving", "bench", "preference", *RECIPES):
        for path, tree in python_files(folder):
            name = path[:-3].replace(os.sep, ".").removesuffix(".__init__")
            modules[name] = (path, tree)

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {name: set() for name in modules}
    for name, (path, tree) in modules.items():
        package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
            else:
                continue
            graph[name] |= {t for t in map(known, targets) if t and t != name}
    return graph


def test_no_import_circle_anywhere():
    """Issue 30: strongly connected components of the import graph (function-level imports included) have one
    module each: a layer can be read, tested and moved without the modules above it."""
    graph, index, low, stack, on_stack, circles = import_graph(), {}, {}, [], set(), []

    def visit(node):  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                circles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    assert not circles, circles


def test_private_library_names_are_touched_in_patches_modules_only():
    """Issue 30.5: a private name of a third-party library (`_`-prefixed: an attribute of a library object, a
    `super()._name`, a library base class's private method overridden or its private state used) appears only in
    tuning/patches.py or model_hub/patches.py, where each says what it changes, why and for which version — or is a
    hook or tokenizer table listed in tests/private_internals.py ALLOWED, with its reason. Everything listed there is
    checked to still exist by tests/test_patches.py."""
    from private_internals import ALLOWED, PATCH_MODULES, private_uses, production_files

    found = [(path, line, what) for path, tree in production_files() if path not in PATCH_MODULES
             for line, name, what in sorted(private_uses(path, tree)) if name not in ALLOWED.get(path, {})]
    assert not found, "move these into a patches module (or use a public API): " + "; ".join(
        f"{path}:{line} {what}" for path, line, what in found)
