"""Nothing reaches the network unless the user asks (issue 25, item 7). The commands run as real processes
with the network blocked (a sitecustomize makes every socket connection and DNS lookup record itself and fail)
and without the offline variables the test suite sets: an adapter folder without weights is one line, no
connection attempted; the Hugging Face libraries are switched offline by every command unless HF_HUB_OFFLINE=0."""
import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO

BLOCK_NETWORK = '''
import os, socket
def _blocked(*args, **kwargs):
    with open(os.environ["NETWORK_MARKER"], "a") as f:
        f.write(repr(args[:2]) + "\\n")
    raise OSError("network blocked by the test")
socket.socket.connect = socket.socket.connect_ex = _blocked
socket.create_connection = socket.getaddrinfo = _blocked
'''
SWITCHES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


def run_offline(args, tmp_path, env_extra=None):
    """(exit code, stderr, network attempts) of a command run in tmp_path with the network blocked."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCK_NETWORK)
    marker = tmp_path / "network_attempts"
    env = {k: v for k, v in os.environ.items() if k not in SWITCHES}
    env.update(PYTHONPATH=f"{site}{os.pathsep}{REPO}", NETWORK_MARKER=str(marker), **(env_extra or {}))
    result = subprocess.run([sys.executable, *args], cwd=tmp_path, capture_output=True, text=True, env=env,
                            timeout=300)
    return result.returncode, result.stderr, marker.read_text() if marker.exists() else ""


@pytest.fixture
def adapter_without_weights(tmp_path):
    """A relative adapter path (peft takes a missing local path for a Hub repo id) with only adapter_config.json."""
    shutil.copytree(os.path.join(REPO, "tests", "malformed", "adapter_stub"), tmp_path / "output")
    return "output"


def _assert_one_line(code, stderr, attempts, path):
    assert attempts == "", f"the network was tried: {attempts}"
    assert code == 2 and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == (
        f"error: {path}: adapter_config.json is here but no adapter weights (adapter_model.safetensors); the save "
        "that wrote this folder did not finish, or the weights were moved")


def test_chatglm_infer_with_an_adapter_without_weights(adapter_without_weights, tmp_path):
    code, stderr, attempts = run_offline([os.path.join(REPO, "chatglm_lora", "infer.py"), "--chatglm_path",
                                          "tiny:chatglm-6b", "--lora_path", adapter_without_weights, "--data_path",
                                          os.path.join(REPO, "tests", "malformed", "alpaca_clean.json")], tmp_path)
    _assert_one_line(code, stderr, attempts, adapter_without_weights)


def test_glm4_inference_with_an_adapter_without_weights(adapter_without_weights, tmp_path):
    code, stderr, attempts = run_offline([os.path.join(REPO, "glm4_finetune", "inference.py"),
                                          adapter_without_weights, "--base-model", "tiny:glm-4-9b-chat"], tmp_path)
    _assert_one_line(code, stderr, attempts, adapter_without_weights)


HUB_LOOKUP = '''
from tuning.errors import run_main

def main():
    from huggingface_hub import hf_hub_download
    try:
        hf_hub_download("THUDM/chatglm-6b", "config.json")
    except Exception as exc:
        print(type(exc).__name__)

run_main(main)
'''


def test_every_command_is_offline_unless_the_user_asks(tmp_path):
    script = tmp_path / "lookup.py"
    script.write_text(HUB_LOOKUP)
    cache = {"HF_HOME": str(tmp_path / "hf_home")}  # an empty cache: only the network could answer
    code, _, attempts = run_offline([str(script)], tmp_path, cache)
    assert code == 0 and attempts == "", f"the network was tried: {attempts}"
    code, _, attempts = run_offline([str(script)], tmp_path, {**cache, "HF_HUB_OFFLINE": "0"})
    assert attempts, "HF_HUB_OFFLINE=0 is how the user asks for the network: the lookup must try it"
