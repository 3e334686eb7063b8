"""No code runs from a model folder unless the user passes --trust_remote_code (issue 25, item 1).

A folder whose config.json / tokenizer_config.json names its own classes (`auto_map`, unknown model_type) makes
transformers ask "run the custom code? [y/N]" when `trust_remote_code` is left unset. Every load passes it
explicitly; such a folder gets one line naming the flag, even when "y" is typed at the terminal.
"""
import ast
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

# Receivers of `.from_pretrained` that never run a folder's code (concrete classes; peft adapters on a loaded
# base model; `super()` inside our own classes). Any other receiver must pass trust_remote_code explicitly.
NO_REMOTE_CODE = {"PeftModel", "PeftModelForCausalLM", "GenerationConfig", "ChatGLMTokenizer",
                  "LlamaSentencePieceTokenizer", "super"}


def _python_files():
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("tests", "build", "__pycache__")]
        for name in files:
            if name.endswith(".py"):
                yield os.path.join(root, name)


def _receiver(func: ast.Attribute) -> str:
    value = func.value
    if isinstance(value, ast.Call):
        value = value.func
    if isinstance(value, ast.Attribute):
        return value.attr
    return getattr(value, "id", "?")


def test_every_from_pretrained_call_passes_trust_remote_code():
    """A new `from_pretrained` call without an explicit trust_remote_code fails here."""
    unsafe = []
    for path in _python_files():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "from_pretrained"):
                continue
            if _receiver(node.func) in NO_REMOTE_CODE:
                continue
            if not any(k.arg == "trust_remote_code" for k in node.keywords):
                unsafe.append(f"{os.path.relpath(path, REPO)}:{node.lineno}")
    assert not unsafe, f"from_pretrained without an explicit trust_remote_code: {unsafe}"


EVIL = "import os\nopen(os.environ['PWNED_MARKER'], 'w').write('ran')\n"


def _evil_folder(folder, with_config: bool = True):
    """A model folder that needs its own code: auto_map + an unknown model_type; importing evil.py leaves a file."""
    os.makedirs(folder, exist_ok=True)
    auto_map = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel",
                "AutoTokenizer": ["evil.EvilTokenizer", None]}
    if with_config:
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump({"model_type": "evil-unknown", "auto_map": auto_map}, f)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "EvilTokenizer", "auto_map": auto_map}, f)
    with open(os.path.join(folder, "evil.py"), "w") as f:
        f.write(EVIL)
    return str(folder)


def _run(args, tmp_path):
    """Run a script answering "y" to any prompt; (exit code, stderr, whether the folder's code ran)."""
    marker = tmp_path / "pwned"
    env = {**os.environ, "PWNED_MARKER": str(marker), "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, *args], cwd=REPO, input="y\ny\ny\n", capture_output=True, text=True,
                            env=env, timeout=300)
    return result.returncode, result.stderr, marker.exists()


def _assert_refused(code, stderr, ran, path):
    assert not ran, "the model folder's code ran"
    assert "Traceback" not in stderr, stderr
    last = stderr.strip().splitlines()[-1]
    assert code == 2 and last.startswith(f"error: {path}") and "--trust_remote_code" in last, stderr


def test_glm4_finetune_refuses_a_model_folder_with_code(tmp_path):
    model = _evil_folder(tmp_path / "model")
    code, stderr, ran = _run(["glm4_finetune/finetune.py", "tests/malformed/glm4/clean", model,
                              "tests/malformed/glm4/train.yaml"], tmp_path)
    _assert_refused(code, stderr, ran, model)


def test_glm4_inference_refuses_a_tokenizer_with_code_beside_an_adapter(tmp_path):
    adapter = _evil_folder(tmp_path / "adapter", with_config=False)
    from model_hub.loader import resolve_model_path

    base = resolve_model_path("tiny:glm-4-9b-chat")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, trust_remote_code=False)
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(adapter)
    code, stderr, ran = _run(["glm4_finetune/inference.py", adapter, "--base-model", base, "--max-new-tokens", "2",
                              "--dtype", "fp32"], tmp_path)
    _assert_refused(code, stderr, ran, adapter)


def test_chat_ner_refuses_a_tokenizer_with_code(tmp_path):
    tokenizer = _evil_folder(tmp_path / "tok", with_config=False)
    code, stderr, ran = _run(["llama_ner/chat_ner.py", "--base_model", "tiny:chinese-alpaca-7b", "--tokenizer_path",
                              tokenizer, "--only_cpu", "--predictions_file", str(tmp_path / "p.json")], tmp_path)
    _assert_refused(code, stderr, ran, tokenizer)


def test_the_loader_refuses_and_the_flag_is_the_only_way_in(tmp_path, monkeypatch):
    from model_hub.loader import load_model_and_tokenizer
    from tuning import consent
    from tuning.errors import UserError

    model = _evil_folder(tmp_path / "model")
    monkeypatch.setenv("PWNED_MARKER", str(tmp_path / "pwned"))
    monkeypatch.setattr("builtins.input", lambda *a: "y")
    with pytest.raises(UserError, match="--trust_remote_code"):
        load_model_and_tokenizer(model)
    assert not (tmp_path / "pwned").exists()
    argv = ["x.py", "--trust_remote_code", "--other"]
    consent.take_flags(argv)
    try:
        assert argv == ["x.py", "--other"] and consent.remote_code_allowed()
    finally:
        consent.take_flags(["x.py"])  # back to the default for the rest of the session
    assert not consent.remote_code_allowed()
