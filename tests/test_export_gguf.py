"""llama.cpp's own converter (convert_hf_to_gguf.py + gguf-py as vendored in the llama-cpp-python==0.3.36 sdist, run
with this venv, nothing compiled) reads our tiny LLaMA and native GLM-4 exports right: the GGUF's rope base, RMS eps,
context length, head counts, rope dimensions and vocabulary size equal the model's config. A native GLM-4 folder
without the original keys (what transformers or other tools write) converts silently wrong — the reason the export
adds them."""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request

import pytest

from model_hub.glm4.native import LLAMA_CPP_KEYS
from model_hub.make_tiny import tiny_dir

VERSION = "0.3.36"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
CACHE = os.path.join(os.path.expanduser("~"), ".cache", "model_hub", f"llama-cpp-python-{VERSION}")
VENDORED = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
NEEDED = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")


def sdist_url() -> str:
    """The sdist's address from PyPI's simple index (PEP 503), checked against the pinned sha256."""
    index = "https://pypi.org/simple/llama-cpp-python/"
    with urllib.request.urlopen(index, timeout=60) as reply:
        page = reply.read().decode()
    found = re.search(rf'href="([^"]*/llama_cpp_python-{VERSION}\.tar\.gz)#sha256=([0-9a-f]+)"', page)
    assert found, f"no llama_cpp_python-{VERSION}.tar.gz in {index}"
    assert found.group(2) == SDIST_SHA256, "PyPI's sdist is not the one this test was written against"
    return urllib.parse.urljoin(index, found.group(1))


def llama_cpp() -> str:
    """The vendored llama.cpp converter folder, downloaded and extracted once into ~/.cache/model_hub (offline:
    extract the sdist's vendor/llama.cpp there yourself)."""
    folder = os.path.join(CACHE, "llama.cpp")
    if os.path.isfile(os.path.join(folder, "convert_hf_to_gguf.py")):
        return folder
    try:
        return download_converter(folder)
    except urllib.error.URLError as exc:
        pytest.fail(f"cannot download llama-cpp-python=={VERSION} from PyPI ({exc.reason}); put its "
                    f"vendor/llama.cpp folder at {folder} to run offline")


def download_converter(folder: str) -> str:
    os.makedirs(CACHE, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".extract-", dir=CACHE)
    try:
        archive = os.path.join(staging, "sdist.tar.gz")
        with urllib.request.urlopen(sdist_url(), timeout=300) as reply, open(archive, "wb") as f:
            shutil.copyfileobj(reply, f)
        with open(archive, "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == SDIST_SHA256
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(VENDORED)
                       and m.name[len(VENDORED):].startswith(NEEDED)]
            tar.extractall(staging, members=members, filter="data")
        try:
            os.replace(os.path.join(staging, VENDORED), folder)
        except OSError:  # another test process extracted the same files first
            if not os.path.isfile(os.path.join(folder, "convert_hf_to_gguf.py")):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


READ_METADATA = """
import json, sys
from gguf import GGUFReader
out = {}
for path in sys.argv[1:]:
    fields = GGUFReader(path).fields.items()
    out[path] = {k: (len(f.data) if k.startswith("tokenizer.ggml.") and len(f.data) > 1 else f.contents())
                 for k, f in fields if not k.startswith("tokenizer.chat_template")}
print(json.dumps(out))
"""


def convert_to_gguf(jobs: list[tuple[str, str]], *extra: str) -> list[dict]:
    """Run llama.cpp's converter on each (model folder, GGUF path) side by side, without this project on the
    path; the key/values of each GGUF, read back with gguf-py."""
    converter = llama_cpp()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    script = os.path.join(converter, "convert_hf_to_gguf.py")
    running = [subprocess.Popen([sys.executable, script, model_dir, "--outtype", "f32", "--outfile", out, *extra],
                                cwd=os.path.dirname(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True) for model_dir, out in jobs]
    for process in running:
        _, stderr = process.communicate(timeout=900)
        assert process.returncode == 0, stderr[-3000:]
    done = subprocess.run([sys.executable, "-c", READ_METADATA, *(out for _, out in jobs)],
                          env={**env, "PYTHONPATH": os.path.join(converter, "gguf-py")}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    metadata = json.loads(done.stdout)
    return [metadata[out] for _, out in jobs]


def mismatches(metadata: dict, config: dict) -> dict:
    """{key: (GGUF value, config value)} where the GGUF disagrees with the native config.json (llama.cpp's default
    where it wrote no key)."""
    arch = metadata["general.architecture"]
    rope = config.get("rope_parameters") or {}
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    want = {
        "rope.freq_base": rope.get("rope_theta", 10000.0),
        "attention.layer_norm_rms_epsilon": config["rms_norm_eps"],
        "context_length": config["max_position_embeddings"],
        "attention.head_count": config["num_attention_heads"],
        "attention.head_count_kv": config["num_key_value_heads"],
        "rope.dimension_count": int(head_dim * rope.get("partial_rotary_factor", 1.0)),
        "block_count": config["num_hidden_layers"],
    }
    got = {key: metadata.get(f"{arch}.{key}", 10000.0 if key == "rope.freq_base" else None) for key in want}
    got["vocab_size"], want["vocab_size"] = metadata["tokenizer.ggml.tokens"], config["vocab_size"]
    return {key: (got[key], value) for key, value in want.items()
            if got[key] is None or abs(got[key] - value) > 1e-6 * abs(value)}  # eps is stored as float32


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """{family: (export folder, GGUF metadata)} for tiny LLaMA and GLM-4 exports (full models re-exported: the same
    config and tokenizer path as a merge), converted side by side."""
    from model_hub.export import export

    root = tmp_path_factory.mktemp("gguf")
    folders = {family: export(tiny_dir(name), str(root / family)) for family, name in
               (("llama", "chinese-alpaca-7b"), ("glm4", "glm-4-9b-chat"))}
    metadata = convert_to_gguf([(folder, str(root / f"{family}.gguf")) for family, folder in folders.items()])
    return {family: (folder, meta) for (family, folder), meta in zip(folders.items(), metadata)}


@pytest.mark.parametrize("family", ["llama", "glm4"])
def test_llama_cpp_converter_reads_the_export_right(converted, family):
    folder, metadata = converted[family]
    assert metadata["general.architecture"] == {"llama": "llama", "glm4": "chatglm"}[family]
    config = json.load(open(os.path.join(folder, "config.json"), encoding="utf-8"))
    assert mismatches(metadata, config) == {}


@pytest.mark.slow
def test_native_glm4_without_the_original_keys_converts_wrong(tmp_path):
    """The tiny GLM-4 as transformers saves it (no original keys): the same check fails, as the issue measured."""
    folder = tiny_dir("glm-4-9b-chat")
    config = json.load(open(os.path.join(folder, "config.json"), encoding="utf-8"))
    assert not set(LLAMA_CPP_KEYS) & set(config)
    [metadata] = convert_to_gguf([(folder, str(tmp_path / "plain.gguf"))], "--vocab-only")
    wrong = mismatches(metadata, config)
    assert wrong.keys() == {"rope.freq_base", "attention.layer_norm_rms_epsilon", "context_length"}
    assert wrong["rope.freq_base"] == (10000.0, 5_000_000.0)
    assert wrong["attention.layer_norm_rms_epsilon"][0] == pytest.approx(1e-5)
    assert wrong["context_length"] == (config["hidden_size"], 131072)
